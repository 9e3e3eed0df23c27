using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// CUDA kernels for LoRA projections with a per-output-row scale c (DoRA, <see cref="LowRankParts.RowScale"/>), so the
/// scales cost no extra passes over activation-sized tensors:
/// <list type="bullet">
/// <item>SwiGLU over the row-scaled gate and up outputs of the fused MLP: the GEMMs give the unscaled g, u and the kernels
/// apply c_g, c_u on load. Forward h = silu(G)·U with G = c_g ⊙ g, U = c_u ⊙ u, each rounded to the activations' dtype as
/// the in-place scaling of the tensor ops would leave it; backward gives the gradients of the unscaled g, u (c ⊙ dG,
/// c ⊙ dU) and the scales' gradients Σ_tokens dG ⊙ g, Σ_tokens dU ⊙ u exactly from the unscaled g, u. Bits of h, dG, dU
/// are those of the SwiGLU kernels on G, U.</item>
/// <item>The backward of y = c ⊙ inner + b for a scaled output kept as y (q, k, v, down): d(inner) = dy ⊙ c and
/// dc = Σ_tokens dy ⊙ (y − b) / c in one pass (as <see cref="LowRankParts.RowScaleGrad"/>, which takes four).</item>
/// </list>
/// fp32 partial sums per row block, then a column reduce. CUDA only (fp32, fp16, bf16; contiguous 2-D);
/// LORAHUB_LORA_ROWSCALE_KERNELS=0 turns them off (the tensor ops then).
/// </summary>
internal static class LoraRowScaleKernels
{
    private static readonly CudaProgram program = new("lora_row_scale.cu", Source);

    private static readonly Dim3 Block = new(32, 8);

    private static long launches;

    /// <summary>Forward and backward calls that ran the kernels so far (tests: a silent fallback must not pass).</summary>
    public static long Launches => Interlocked.Read(ref launches);

    /// <summary>Whether the kernels may be used (default on; LORAHUB_LORA_ROWSCALE_KERNELS=0: off).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LORA_ROWSCALE_KERNELS")?.Trim() != "0";

    /// <summary>True when the SwiGLU kernels apply to the gate and up outputs g, u (silu, CUDA, contiguous 2-D, one dtype).</summary>
    public static bool Applies(string activation, Tensor g, Tensor u) =>
        Enabled && activation == "silu" && torchx.nn.functional.Fused.SwiGlu && Usable(g) && g.dim() == 2 && g.numel() > 0
        && g.is_contiguous() && u.is_contiguous() && u.dtype == g.dtype && u.shape.SequenceEqual(g.shape) && Compiles(DeviceIndex(g));

    /// <summary>True when the row-scale backward kernel applies to the gradient dy (rows × cols) of a scaled output.</summary>
    public static bool AppliesTo(Tensor dy) => Enabled && Usable(dy) && dy.dim() == 2 && dy.numel() > 0 && Compiles(DeviceIndex(dy));

    /// <summary>Why these kernels are off after a failed compile (null: they compiled, or were not tried).</summary>
    public static string? CompileFailure => program.CompileFailure;

    private static bool Compiles(int device) => program.Compiles(device, "DoRA's row scales run as tensor ops instead");

    // About 8 blocks of 256 threads per multiprocessor over all column tiles.
    private static int RowBlocks(Tensor on, long rows, long nvec)
    {
        long sms = CudaKernels.MultiprocessorCount(DeviceIndex(on));
        var tiles = Math.Max(1, (nvec + 31) / 32);
        var by = Math.Min((rows + 7) / 8, Math.Max(1, 8 * sms / tiles));
        return (int)Math.Clamp(by, 1, 65535);
    }

    private static Tensor? F32(Tensor? c) => c is null ? null : c.to(ScalarType.Float32).contiguous();

    private static (string suffix, long nvec) Layout(Tensor g, params Tensor[] others)
    {
        var cols = g.size(1);
        var v = VectorWidth(g.dtype);
        var vec = cols % v == 0 && Aligned16(Ptr(g)) && others.All(t => Aligned16(Ptr(t)));
        return ($"{Suffix(g.dtype)}_{(vec ? "v" : "1")}", vec ? cols / v : cols);
    }

    /// <summary>h = silu(c_g ⊙ g)·(c_u ⊙ u) for the unscaled g, u (rows × cols); a null scale is 1. Call only where <see cref="Applies"/>.</summary>
    public static Tensor SwiGluForward(Tensor g, Tensor u, Tensor? cg, Tensor? cu)
    {
        using var scope = NewDisposeScope();
        var h = empty_like(g);
        var (cg32, cu32) = (F32(cg), F32(cu));
        var rows = g.size(0);
        var (suffix, nvec) = Layout(g, u, h);
        program.Function(DeviceIndex(g), $"lh_lora_sswiglu_fwd_{suffix}")
            .Launch(new Dim3((uint)((nvec + 31) / 32), (uint)RowBlocks(g, rows, nvec)), Block, 0,
                new KernelArgs().Ptr(Ptr(g)).Ptr(Ptr(u)).Ptr(cg32 is null ? IntPtr.Zero : Ptr(cg32)).Ptr(cu32 is null ? IntPtr.Zero : Ptr(cu32))
                    .Ptr(Ptr(h)).I64(rows).I64(nvec));
        Interlocked.Increment(ref launches);
        return h.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// From dh = ∂L/∂h: the gradients of the unscaled g and u, and those of the scales (fp32, null for a null scale).
    /// </summary>
    public static (Tensor dg, Tensor du, Tensor? dcg, Tensor? dcu) SwiGluBackward(Tensor dh, Tensor g, Tensor u, Tensor? cg, Tensor? cu)
    {
        using var scope = NewDisposeScope();
        var d = dh.dtype == g.dtype ? dh.contiguous() : dh.to(g.dtype).contiguous();
        var dg = empty_like(g);
        var du = empty_like(u);
        var (cg32, cu32) = (F32(cg), F32(cu));
        long rows = g.size(0), cols = g.size(1);
        var (suffix, nvec) = Layout(g, u, d, dg, du);
        var blocks = RowBlocks(g, rows, nvec);
        var pg = cg32 is null ? null : empty([blocks, cols], ScalarType.Float32, g.device);
        var pu = cu32 is null ? null : empty([blocks, cols], ScalarType.Float32, g.device);
        IntPtr P(Tensor? t) => t is null ? IntPtr.Zero : Ptr(t);
        var device = DeviceIndex(g);
        program.Function(device, $"lh_lora_sswiglu_bwd_{suffix}")
            .Launch(new Dim3((uint)((nvec + 31) / 32), (uint)blocks), Block, 0,
                new KernelArgs().Ptr(Ptr(d)).Ptr(Ptr(g)).Ptr(Ptr(u)).Ptr(P(cg32)).Ptr(P(cu32)).Ptr(Ptr(dg)).Ptr(Ptr(du))
                    .Ptr(P(pg)).Ptr(P(pu)).I64(rows).I64(nvec));
        Tensor? Reduce(Tensor? partial) => partial is null ? null : ColumnSums(partial, blocks, cols).MoveToOuterDisposeScope();
        var (dcg, dcu) = (Reduce(pg), Reduce(pu));
        Interlocked.Increment(ref launches);
        return (dg.MoveToOuterDisposeScope(), du.MoveToOuterDisposeScope(), dcg, dcu);
    }

    // Σ over the rows of partial (blocks × cols, fp32); with c (cols, fp32) that sum divided by c, 0 where c is 0 (in the
    // same kernel: the where/eq/zeros_like/div of the tensor ops were four more launches per projection in backward).
    private static Tensor ColumnSums(Tensor partial, int blocks, long cols, Tensor? divisor = null)
    {
        var sum = empty([cols], ScalarType.Float32, partial.device);
        program.Function(DeviceIndex(partial), "lh_lora_col_reduce")
            .Launch((int)((cols + 31) / 32), Block, 0,
                new KernelArgs().Ptr(Ptr(partial)).I32(blocks).Ptr(divisor is null ? IntPtr.Zero : Ptr(divisor)).Ptr(Ptr(sum)).I64(cols));
        return sum;
    }

    /// <summary>
    /// For y = c ⊙ inner + b (rows × cols, kept as <paramref name="y"/>; null when c needs no gradient): d(inner) = dy ⊙ c
    /// and, with y, dc = Σ_rows dy ⊙ (y − b) / c (fp32; 0 where c = 0, as DoRA's output kernel), in one pass.
    /// </summary>
    public static (Tensor dInner, Tensor? dc) RowScaleBackward(Tensor dy, Tensor? y, Tensor c, Tensor? bias)
    {
        using var scope = NewDisposeScope();
        var g = dy.contiguous();
        var yc = y is null ? null : y.dtype == g.dtype ? y.contiguous() : y.to(g.dtype).contiguous();
        var d = empty_like(g);
        var c32 = c.to(ScalarType.Float32).contiguous();
        var b = yc is not null && bias is not null ? bias.to(g.dtype).contiguous() : null;
        long rows = g.size(0), cols = g.size(1);
        var (suffix, nvec) = yc is null ? Layout(g, d) : Layout(g, d, yc);
        var blocks = RowBlocks(g, rows, nvec);
        var partial = yc is null ? null : empty([blocks, cols], ScalarType.Float32, g.device);
        program.Function(DeviceIndex(g), $"lh_lora_rowscale_bwd_{suffix}")
            .Launch(new Dim3((uint)((nvec + 31) / 32), (uint)blocks), Block, 0,
                new KernelArgs().Ptr(Ptr(g)).Ptr(yc is null ? IntPtr.Zero : Ptr(yc)).Ptr(Ptr(c32)).Ptr(b is null ? IntPtr.Zero : Ptr(b))
                    .Ptr(Ptr(d)).Ptr(partial is null ? IntPtr.Zero : Ptr(partial)).I64(rows).I64(nvec));
        Tensor? dc = null;
        if (partial is not null)
        {
            dc = ColumnSums(partial, blocks, cols, c32).MoveToOuterDisposeScope();
        }
        Interlocked.Increment(ref launches);
        return (d.MoveToOuterDisposeScope(), dc);
    }

    // Blocks of 32 × 8 threads: 32 column vectors (16 bytes each where the data allows) by 8 rows; grid.y blocks stride down
    // the rows (as DoRA's output kernels). A null scale pointer means 1 (and no partial sums for it).
    private const string Source = """
        #include "lh_common.cuh"

        #define LH_TILE_X 32
        #define LH_ROWS_Y 8

        template <typename T, int N>
        __device__ __forceinline__ void sswiglu_forward(const T* __restrict__ g, const T* __restrict__ u, const float* __restrict__ cg,
                                                        const float* __restrict__ cu, T* __restrict__ h, i64 rows, i64 nvec) {
          const i64 vc = static_cast<i64>(blockIdx.x) * LH_TILE_X + threadIdx.x;
          if (vc >= nvec) return;
          const i64 cols = nvec * N;
          float sg[N], su[N];
        #pragma unroll
          for (int k = 0; k < N; k++) {
            sg[k] = cg != nullptr ? cg[vc * N + k] : 1.f;
            su[k] = cu != nullptr ? cu[vc * N + k] : 1.f;
          }
          const i64 step = static_cast<i64>(gridDim.y) * LH_ROWS_Y;
          for (i64 r = static_cast<i64>(blockIdx.y) * LH_ROWS_Y + threadIdx.y; r < rows; r += step) {
            const Pack<T, N> gp = reinterpret_cast<const Pack<T, N>*>(g + r * cols)[vc];
            const Pack<T, N> up = reinterpret_cast<const Pack<T, N>*>(u + r * cols)[vc];
            Pack<T, N> o;
        #pragma unroll
            for (int k = 0; k < N; k++) {
              const float G = round_to<T>(sg[k] * Cvt<T>::to(gp.v[k]));
              const float U = round_to<T>(su[k] * Cvt<T>::to(up.v[k]));
              const float act = round_to<T>(G * lh_sigmoid(G));
              o.v[k] = Cvt<T>::from(act * U);
            }
            reinterpret_cast<Pack<T, N>*>(h + r * cols)[vc] = o;
          }
        }

        template <typename T, int N>
        __device__ __forceinline__ void sswiglu_backward(const T* __restrict__ dh, const T* __restrict__ g, const T* __restrict__ u,
                                                         const float* __restrict__ cg, const float* __restrict__ cu,
                                                         T* __restrict__ dg, T* __restrict__ du, float* __restrict__ pg,
                                                         float* __restrict__ pu, i64 rows, i64 nvec) {
          __shared__ float red[2][LH_ROWS_Y][LH_TILE_X * N];
          const i64 vc = static_cast<i64>(blockIdx.x) * LH_TILE_X + threadIdx.x;
          const bool active = vc < nvec;
          const i64 cols = nvec * N;
          float ag[N], au[N];
        #pragma unroll
          for (int k = 0; k < N; k++) {
            ag[k] = 0.f;
            au[k] = 0.f;
          }
          if (active) {
            float sg[N], su[N];
        #pragma unroll
            for (int k = 0; k < N; k++) {
              sg[k] = cg != nullptr ? cg[vc * N + k] : 1.f;
              su[k] = cu != nullptr ? cu[vc * N + k] : 1.f;
            }
            const i64 step = static_cast<i64>(gridDim.y) * LH_ROWS_Y;
            for (i64 r = static_cast<i64>(blockIdx.y) * LH_ROWS_Y + threadIdx.y; r < rows; r += step) {
              const Pack<T, N> dp = reinterpret_cast<const Pack<T, N>*>(dh + r * cols)[vc];
              const Pack<T, N> gp = reinterpret_cast<const Pack<T, N>*>(g + r * cols)[vc];
              const Pack<T, N> up = reinterpret_cast<const Pack<T, N>*>(u + r * cols)[vc];
              Pack<T, N> og, ou;
        #pragma unroll
              for (int k = 0; k < N; k++) {
                const float d = Cvt<T>::to(dp.v[k]);
                const float gv = Cvt<T>::to(gp.v[k]);
                const float uv = Cvt<T>::to(up.v[k]);
                const float G = round_to<T>(sg[k] * gv);
                const float U = round_to<T>(su[k] * uv);
                const float s = lh_sigmoid(G);
                const float act = round_to<T>(G * s);
                const float dU = round_to<T>(d * act);
                const float dG = round_to<T>(d * U * s * (1.f + G * (1.f - s)));
                ag[k] = fmaf(dG, gv, ag[k]);
                au[k] = fmaf(dU, uv, au[k]);
                og.v[k] = Cvt<T>::from(dG * sg[k]);
                ou.v[k] = Cvt<T>::from(dU * su[k]);
              }
              reinterpret_cast<Pack<T, N>*>(dg + r * cols)[vc] = og;
              reinterpret_cast<Pack<T, N>*>(du + r * cols)[vc] = ou;
            }
          }
        #pragma unroll
          for (int k = 0; k < N; k++) {
            red[0][threadIdx.y][threadIdx.x * N + k] = ag[k];
            red[1][threadIdx.y][threadIdx.x * N + k] = au[k];
          }
          __syncthreads();
          if (threadIdx.y == 0 && active) {
        #pragma unroll
            for (int k = 0; k < N; k++) {
              float sgk = 0.f, suk = 0.f;
        #pragma unroll
              for (int j = 0; j < LH_ROWS_Y; j++) {
                sgk += red[0][j][threadIdx.x * N + k];
                suk += red[1][j][threadIdx.x * N + k];
              }
              const i64 at = static_cast<i64>(blockIdx.y) * cols + vc * N + k;
              if (pg != nullptr) pg[at] = sgk;
              if (pu != nullptr) pu[at] = suk;
            }
          }
        }

        // d = dy·c; with y, per-block column sums of dy·(y − b) into partial[blockIdx.y, :] (partial null: y is null too).
        template <typename T, int N>
        __device__ __forceinline__ void rowscale_backward(const T* __restrict__ dy, const T* __restrict__ y, const float* __restrict__ c,
                                                          const T* __restrict__ bias, T* __restrict__ d, float* __restrict__ partial,
                                                          i64 rows, i64 nvec) {
          __shared__ float red[LH_ROWS_Y][LH_TILE_X * N];
          const i64 vc = static_cast<i64>(blockIdx.x) * LH_TILE_X + threadIdx.x;
          const bool active = vc < nvec;
          const i64 cols = nvec * N;
          float acc[N];
        #pragma unroll
          for (int k = 0; k < N; k++) acc[k] = 0.f;
          if (active) {
            float cc[N], bb[N];
        #pragma unroll
            for (int k = 0; k < N; k++) {
              cc[k] = c[vc * N + k];
              bb[k] = bias != nullptr ? Cvt<T>::to(bias[vc * N + k]) : 0.f;
            }
            const i64 step = static_cast<i64>(gridDim.y) * LH_ROWS_Y;
            for (i64 r = static_cast<i64>(blockIdx.y) * LH_ROWS_Y + threadIdx.y; r < rows; r += step) {
              const Pack<T, N> gp = reinterpret_cast<const Pack<T, N>*>(dy + r * cols)[vc];
              Pack<T, N> o;
        #pragma unroll
              for (int k = 0; k < N; k++) o.v[k] = Cvt<T>::from(Cvt<T>::to(gp.v[k]) * cc[k]);
              reinterpret_cast<Pack<T, N>*>(d + r * cols)[vc] = o;
              if (y != nullptr) {
                const Pack<T, N> yp = reinterpret_cast<const Pack<T, N>*>(y + r * cols)[vc];
        #pragma unroll
                for (int k = 0; k < N; k++) acc[k] = fmaf(Cvt<T>::to(gp.v[k]), Cvt<T>::to(yp.v[k]) - bb[k], acc[k]);
              }
            }
          }
          if (partial == nullptr) return;  // the same for the whole block: no thread waits at the barrier below
        #pragma unroll
          for (int k = 0; k < N; k++) red[threadIdx.y][threadIdx.x * N + k] = acc[k];
          __syncthreads();
          if (threadIdx.y == 0 && active) {
            float* out = partial + static_cast<i64>(blockIdx.y) * cols + vc * N;
        #pragma unroll
            for (int k = 0; k < N; k++) {
              float s = 0.f;
        #pragma unroll
              for (int j = 0; j < LH_ROWS_Y; j++) s += red[j][threadIdx.x * N + k];
              out[k] = s;
            }
          }
        }

        // out[j] = Σ_b partial[b, j] (block 32 × 8: 32 columns, 8 lanes over the partial rows); with div, that sum / div[j]
        // (IEEE division, as the tensor ops), 0 where div[j] is 0.
        extern "C" __global__ void lh_lora_col_reduce(const float* __restrict__ partial, int blocks, const float* __restrict__ div,
                                                      float* __restrict__ out, i64 cols) {
          __shared__ float tile[8][33];
          const i64 j = static_cast<i64>(blockIdx.x) * 32 + threadIdx.x;
          float s = 0.f;
          if (j < cols) {
            for (int b = threadIdx.y; b < blocks; b += 8) s += partial[static_cast<i64>(b) * cols + j];
          }
          tile[threadIdx.y][threadIdx.x] = s;
          __syncthreads();
          if (threadIdx.y == 0 && j < cols) {
            float total = 0.f;
        #pragma unroll
            for (int i = 0; i < 8; i++) total += tile[i][threadIdx.x];
            out[j] = div == nullptr ? total : div[j] != 0.f ? total / div[j] : 0.f;
          }
        }

        #define LH_WIDTH_1(T) 1
        #define LH_WIDTH_v(T) (16 / sizeof(T))

        #define LH_SSWIGLU_ENTRIES(T, S, V)                                                                                \
          extern "C" __global__ void lh_lora_sswiglu_fwd_##S##_##V(const T* g, const T* u, const float* cg, const float* cu, \
                                                                   T* h, i64 rows, i64 nvec) {                              \
            sswiglu_forward<T, LH_WIDTH_##V(T)>(g, u, cg, cu, h, rows, nvec);                                               \
          }                                                                                                                 \
          extern "C" __global__ void lh_lora_sswiglu_bwd_##S##_##V(const T* dh, const T* g, const T* u, const float* cg,   \
                                                                   const float* cu, T* dg, T* du, float* pg, float* pu,     \
                                                                   i64 rows, i64 nvec) {                                    \
            sswiglu_backward<T, LH_WIDTH_##V(T)>(dh, g, u, cg, cu, dg, du, pg, pu, rows, nvec);                             \
          }                                                                                                                 \
          extern "C" __global__ void lh_lora_rowscale_bwd_##S##_##V(const T* dy, const T* y, const float* c, const T* bias, \
                                                                    T* d, float* partial, i64 rows, i64 nvec) {             \
            rowscale_backward<T, LH_WIDTH_##V(T)>(dy, y, c, bias, d, partial, rows, nvec);                                  \
          }

        LH_SSWIGLU_ENTRIES(float, f32, 1)
        LH_SSWIGLU_ENTRIES(float, f32, v)
        LH_SSWIGLU_ENTRIES(f16, f16, 1)
        LH_SSWIGLU_ENTRIES(f16, f16, v)
        LH_SSWIGLU_ENTRIES(bf16, bf16, 1)
        LH_SSWIGLU_ENTRIES(bf16, bf16, v)
        """;
}
