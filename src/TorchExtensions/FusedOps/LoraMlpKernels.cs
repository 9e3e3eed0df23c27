using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// CUDA kernels for the fused LoRA MLP (<see cref="LoraMlpFunction"/>) that add the gate, up and down low-rank updates
/// inside the gated activation, so none of them is a separate pass over a tokens × intermediate tensor:
/// <list type="bullet">
/// <item>Forward: h = act(G)·U from the base GEMM outputs g, u with G = g + s_g·xa_g·B_gᵀ, U = u + s_u·xa_u·B_uᵀ (xa: the
/// thin x·[A_g; A_u]ᵀ). G and U are never written: g and u are saved without their updates.</item>
/// <item>Backward: D = dh + dxa_d·A_d (dh = dy·W_dᵀ, dxa_d = s_d·dy·B_d), G and U recomputed as in forward; writes
/// dG, dU (the gradients of g and u too) and, where A_d needs its gradient, h for dA_d = dxa_dᵀ·h. Outputs may be the
/// inputs' memory: every element is read and written by one thread (the launcher writes dG over dh, dU over u, h over g).</item>
/// <item>Row scales c_g, c_u (DoRA; where <see cref="FoldRowScales"/>): G, U scaled on load and rounded as
/// <see cref="LoraRowScaleKernels"/>' SwiGLU does; backward gives c ⊙ dG, c ⊙ dU and the scales' gradients Σ_tokens dG ⊙ G
/// (per token tile in the kernel, then a column reduce).</item>
/// </list>
/// The sums run in fp32 and G, U, D are rounded to the activations' dtype, as the composite path's addmm leaves them; act,
/// act(G)·U and the gradients round as the SwiGLU kernels (and <see cref="LoraGatedActivation"/>) do. A block computes a
/// tile of (32·M tokens × 64 columns): the ranks of all updates are staged together in chunks of 128/M in shared memory
/// (fp32; all loads of a chunk in flight at once), each thread keeps an M × 8 register tile per update, so a B row and an
/// xa row are read once per tile, not per element. Activations: silu,
/// gelu_pytorch_tanh / gelu_new, gelu. CUDA only (fp32, fp16, bf16), each update's rank up to <see cref="MaxRank"/>;
/// LORAHUB_LORA_MLP_KERNEL=0 turns them off (the addmm path then). A compile failure turns only these off.
/// </summary>
internal static class LoraMlpKernels
{
    /// <summary>Largest rank per projection taken: beyond it the FMAs (rank per element) cost more than the addmm GEMM.</summary>
    public const long MaxRank = 64;

    private static readonly CudaProgram program = new("lora_mlp_lowrank.cu", Source);

    private static long launches;

    /// <summary>Forward and backward launches so far (tests: a silent fallback must not pass).</summary>
    public static long Launches => Interlocked.Read(ref launches);

    /// <summary>Whether the kernels may be used (default on; LORAHUB_LORA_MLP_KERNEL=0: off).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL")?.Trim() != "0";

    /// <summary>Why the kernels are off after a failed compile (null: they compiled, or were not tried).</summary>
    public static string? CompileFailure => program.CompileFailure;

    // Tokens per thread (a tile is 32·M tokens): forward 4 (each B value read from shared memory serves 4 tokens; shared
    // loads, not FMAs, bound the sums at 2), backward 2 (three register tiles; 4 would spill). LORAHUB_LORA_MLP_TILE="fwd,bwd"
    // (each 2 or 4) for tuning runs.
    private static readonly (int fwd, int bwd) tile = ParseTile(Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_TILE"));

    private static (int, int) ParseTile(string? spec)
    {
        var parts = (spec ?? "").Split(',', StringSplitOptions.TrimEntries);
        static int M(string s, int fallback) => s is "2" or "4" ? int.Parse(s) : fallback;
        return parts.Length == 2 ? (M(parts[0], 4), M(parts[1], 2)) : (4, 2);
    }

    /// <summary>The kernels' activation code, or -1.</summary>
    private static int ActivationCode(string activation) => activation switch
    {
        "silu" => 0,
        "gelu_pytorch_tanh" or "gelu_new" => 1,
        "gelu" => 2,
        _ => -1,
    };

    /// <summary>
    /// True when the kernels take the gated activation over the gate and up base outputs g, u (contiguous 2-D CUDA tensors
    /// of one dtype and shape) with updates of these ranks (0: none). They follow <see cref="torchx.nn.functional.Fused.SwiGlu"/>
    /// too (the gated-activation kernels' switch).
    /// </summary>
    public static bool Applies(string activation, Tensor g, Tensor u, long rankGate, long rankUp, long rankDown) =>
        Enabled && torchx.nn.functional.Fused.SwiGlu && ActivationCode(activation) >= 0 && Usable(g) && g.dim() == 2 && g.numel() > 0 && g.is_contiguous()
        && u.is_contiguous() && u.dtype == g.dtype && u.shape.SequenceEqual(g.shape)
        && rankGate <= MaxRank && rankUp <= MaxRank && rankDown <= MaxRank
        && program.Compiles(DeviceIndex(g), "the LoRA MLP adds its low-rank updates by addmm instead");

    /// <summary>
    /// Whether the kernels also take gate/up row scales (DoRA, y = c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ)) in place of
    /// <see cref="LoraRowScaleKernels"/>' SwiGLU and the addmm passes (default on; LORAHUB_LORA_MLP_KERNEL_DORA=0: off), and
    /// only while the row-scale kernels are on.
    /// </summary>
    public static bool FoldRowScales { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL_DORA")?.Trim() != "0";

    // The gate/up arguments: xa (tokens × (r_g + r_u), unit column stride, row stride ld; up's columns after gate's), then
    // per projection its rank, B (F × r: element (j, k) at j·stride(0) + k·stride(1)) and B's strides. A null B: rank 0.
    private static KernelArgs GateUp(KernelArgs a, Tensor? xa, Tensor? bGate, Tensor? bUp)
    {
        static KernelArgs B(KernelArgs a, Tensor? b) =>
            b is null ? a.I32(0).Ptr(IntPtr.Zero).I64(0).I64(0) : a.I32((int)b.size(1)).Ptr(Ptr(b)).I64(b.stride(0)).I64(b.stride(1));
        if (xa is null || (bGate is null && bUp is null)) return B(B(a.Ptr(IntPtr.Zero).I64(0), null), null);
        if (xa.dim() != 2 || xa.stride(1) != 1) throw new ArgumentException("xa must be a 2-D tensor with unit column stride");
        return B(B(a.Ptr(Ptr(xa)).I64(xa.stride(0)), bGate), bUp);
    }

    private static int Grid(long rows, long cols, int m) => checked((int)(((cols + 63) / 64) * ((rows + 32 * m - 1) / (32 * m))));

    // 8 columns per thread as one access where every row starts aligned (Pack<T, 8>: 16 bytes for 16-bit types, 32 for fp32).
    private static int Vector(Tensor g, params Tensor?[] others)
    {
        var bytes = 8 * g.element_size();
        bool Aligned(Tensor? t) => t is null || (long)Ptr(t) % bytes == 0;
        return g.size(1) % 8 == 0 && Aligned(g) && others.All(Aligned) ? 1 : 0;
    }

    private static Tensor? F32(Tensor? c) => c is null ? null : c.to(ScalarType.Float32).contiguous();

    private static IntPtr P(Tensor? t) => t is null ? IntPtr.Zero : Ptr(t);

    /// <summary>
    /// h = act(c_g ⊙ (g + s_g·xa[:, :r_g]·B_gᵀ)) · (c_u ⊙ (u + s_u·xa[:, r_g:]·B_uᵀ)) for base outputs g, u (tokens × F) and
    /// xa (tokens × (r_g + r_u)); a null B (rank 0) is no update, a null row scale c is 1. B's in the activations' dtype.
    /// Call only where <see cref="Applies"/>.
    /// </summary>
    public static Tensor Forward(string activation, Tensor g, Tensor u, Tensor? xa, Tensor? bGate, Tensor? bUp, double scaleGate, double scaleUp,
        Tensor? cGate = null, Tensor? cUp = null)
    {
        using var scope = NewDisposeScope();
        long rows = g.size(0), cols = g.size(1);
        var h = empty_like(g);
        var (cg, cu) = (F32(cGate), F32(cUp));
        var m = tile.fwd;
        var args = GateUp(new KernelArgs().Ptr(Ptr(g)).Ptr(Ptr(u)), xa, bGate, bUp)
            .F32((float)scaleGate).F32((float)scaleUp).Ptr(P(cg)).Ptr(P(cu)).Ptr(Ptr(h))
            .I64(rows).I64(cols).I32(ActivationCode(activation)).I32(Vector(g, u, h));
        program.Function(DeviceIndex(g), $"lh_lora_mlp_fwd_{Suffix(g.dtype)}_m{m}").Launch(Grid(rows, cols, m), new Dim3(8, 32), 0, args);
        Interlocked.Increment(ref launches);
        return h.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Backward of <see cref="Forward"/> followed by down: from dh = dy·W_dᵀ (tokens × F, ours: overwritten), the down
    /// update's dxa_d = s_d·dy·B_d (tokens × r_d, null: none) and A_d (r_d × F), with D = dh + dxa_d·A_d: the gradients of
    /// g and u (in dh's and u's memory), with <paramref name="wantH"/> h = act(G)·U (in g's memory), and the row scales'
    /// gradients (fp32; null for a null scale). g and u are consumed: the caller must not read them afterwards. Call only
    /// where <see cref="Applies"/>.
    /// </summary>
    public static (Tensor dg, Tensor du, Tensor? h, Tensor? dcGate, Tensor? dcUp) Backward(string activation, Tensor dh, Tensor? dxaDown, Tensor? aDown,
        Tensor g, Tensor u, Tensor? xa, Tensor? bGate, Tensor? bUp, double scaleGate, double scaleUp, bool wantH, Tensor? cGate = null, Tensor? cUp = null)
    {
        if (!dh.is_contiguous() || dh.dtype != g.dtype || !dh.shape.SequenceEqual(g.shape)) throw new ArgumentException("dh must be contiguous, of g's dtype and shape");
        if (dxaDown is not null && (dxaDown.dim() != 2 || dxaDown.stride(1) != 1)) throw new ArgumentException("dxa_down must have unit column stride");
        using var scope = NewDisposeScope();
        long rows = g.size(0), cols = g.size(1);
        var m = tile.bwd;
        var tokenTiles = (int)((rows + 32 * m - 1) / (32 * m));
        var (cg, cu) = (F32(cGate), F32(cUp));
        var pg = cg is null ? null : empty([tokenTiles, cols], ScalarType.Float32, g.device);
        var pu = cu is null ? null : empty([tokenTiles, cols], ScalarType.Float32, g.device);
        var args = new KernelArgs().Ptr(Ptr(dh));
        // A_d (r_d × F): element (j, k) = A_d[k, j].
        if (dxaDown is null || aDown is null) args.Ptr(IntPtr.Zero).I64(0).I32(0).Ptr(IntPtr.Zero).I64(0).I64(0);
        else args.Ptr(Ptr(dxaDown)).I64(dxaDown.stride(0)).I32((int)aDown.size(0)).Ptr(Ptr(aDown)).I64(aDown.stride(1)).I64(aDown.stride(0));
        GateUp(args.Ptr(Ptr(g)).Ptr(Ptr(u)), xa, bGate, bUp)
            .F32((float)scaleGate).F32((float)scaleUp).Ptr(P(cg)).Ptr(P(cu)).Ptr(P(pg)).Ptr(P(pu))
            // In place: dG over dh, dU over u, h over g.
            .Ptr(Ptr(dh)).Ptr(Ptr(u)).Ptr(wantH ? Ptr(g) : IntPtr.Zero)
            .I64(rows).I64(cols).I32(ActivationCode(activation)).I32(Vector(g, u, dh));
        var device = DeviceIndex(g);
        program.Function(device, $"lh_lora_mlp_bwd_{Suffix(g.dtype)}_m{m}").Launch(Grid(rows, cols, m), new Dim3(8, 32), 0, args);
        Tensor? Reduce(Tensor? partial)
        {
            if (partial is null) return null;
            var sum = empty([cols], ScalarType.Float32, partial.device);
            program.Function(device, "lh_lora_mlp_col_reduce")
                .Launch((int)((cols + 31) / 32), new Dim3(32, 8), 0, new KernelArgs().Ptr(Ptr(partial)).I32(tokenTiles).Ptr(Ptr(sum)).I64(cols));
            return sum.MoveToOuterDisposeScope();
        }
        var (dcg, dcu) = (Reduce(pg), Reduce(pu));
        Interlocked.Increment(ref launches);
        return (dh, u, wantH ? g : null, dcg, dcu);
    }

    // Block 8 × 32 threads: threadIdx.x picks 8 consecutive columns of a 64-column tile, threadIdx.y M consecutive tokens of
    // a 32·M-token tile; blockIdx.x numbers the tiles, column tiles fastest. The base values are loaded first, the low-rank
    // terms' ranks concatenated (forward: gate, up; backward: down, gate, up) and staged chunk by chunk (one chunk for
    // r = 16), then every element's update comes from registers.
    private const string Source = """

        #include "lh_common.cuh"

        #define LM_TX 8
        #define LM_TY 32
        #define LM_TN 64
        #define LM_THREADS 256

        // One low-rank term: Σ_k x[t·ldx + k] · W(j, k) over k < rank, W(j, k) at w[j·wj + k·wk].
        template <typename T>
        struct LowRankTerm {
          const T* x;
          i64 ldx;
          int rank;
          const T* w;
          i64 wj;
          i64 wk;
        };

        // 8 consecutive elements of a row (zeros outside the tensor), kept in T until used.
        template <typename T>
        __device__ __forceinline__ Pack<T, 8> load8(const T* p, i64 row, i64 rows, i64 col, i64 cols, int vec) {
          Pack<T, 8> pk;
          if (row < rows && col < cols) {
            const T* q = p + row * cols + col;
            if (vec) {
              pk = *reinterpret_cast<const Pack<T, 8>*>(q);
            } else {
        #pragma unroll
              for (int c = 0; c < 8; c++) pk.v[c] = col + c < cols ? q[c] : Cvt<T>::from(0.f);
            }
          } else {
        #pragma unroll
            for (int c = 0; c < 8; c++) pk.v[c] = Cvt<T>::from(0.f);
          }
          return pk;
        }

        template <typename T>
        __device__ __forceinline__ void store8(T* p, i64 row, i64 rows, i64 col, i64 cols, int vec, const float (&v)[8]) {
          if (row >= rows || col >= cols) return;
          T* q = p + row * cols + col;
          if (vec) {
            Pack<T, 8> pk;
        #pragma unroll
            for (int c = 0; c < 8; c++) pk.v[c] = Cvt<T>::from(v[c]);
            *reinterpret_cast<Pack<T, 8>*>(q) = pk;
          } else {
        #pragma unroll
            for (int c = 0; c < 8; c++)
              if (col + c < cols) q[c] = Cvt<T>::from(v[c]);
          }
        }

        // W(j, k) and x[t, k] for k in the terms' concatenated rank (the term found by an unrolled compare chain: no indexing of
        // the term array by a run-time value, which would put it in local memory).
        template <typename T, int NS>
        __device__ __forceinline__ float term_w(const LowRankTerm<T> (&tm)[NS], int k, i64 j) {
          float v = 0.f;
          int base = 0;
        #pragma unroll
          for (int s = 0; s < NS; s++) {
            if (k >= base && k < base + tm[s].rank) v = Cvt<T>::to(tm[s].w[j * tm[s].wj + static_cast<i64>(k - base) * tm[s].wk]);
            base += tm[s].rank;
          }
          return v;
        }

        template <typename T, int NS>
        __device__ __forceinline__ float term_x(const LowRankTerm<T> (&tm)[NS], int k, i64 t) {
          float v = 0.f;
          int base = 0;
        #pragma unroll
          for (int s = 0; s < NS; s++) {
            if (k >= base && k < base + tm[s].rank) v = Cvt<T>::to(tm[s].x[t * tm[s].ldx + (k - base)]);
            base += tm[s].rank;
          }
          return v;
        }

        // acc[s][m][c] = term s at (token t0 + ty·M + m, column j0 + 8·tx + c), for the block's tile of 32·M tokens × 64 columns.
        // The terms' ranks are concatenated and staged in chunks of KC = 128 / M: W's chunk (64 columns) and x's chunk (32·M
        // tokens), fp32, in shared memory; every load of a chunk is issued before the first store (one memory latency per chunk,
        // not one per element). W's row k holds column 8·tx + 4·half + c at half·32 + 4·(tx ^ (k mod 8)) + c: a thread reads its
        // 8 columns as two 16-byte words, the 8 threads of a row on distinct banks; the staging (8 k × 4 columns or tokens per
        // warp) writes without conflicts too. Every thread of the block calls it (barriers inside).
        template <typename T, int M, int NS>
        __device__ __forceinline__ void lowrank(float (&acc)[NS][M][8], const LowRankTerm<T> (&tm)[NS], i64 t0, i64 rows, i64 j0,
                                                i64 cols, float* bs, float* xs) {
          constexpr int TM = LM_TY * M;
          constexpr int KC = 128 / M;
          constexpr int XS = TM + 4;
          constexpr int PB = LM_TN * KC / LM_THREADS;
          constexpr int PX = TM * KC / LM_THREADS;
          const int tid = threadIdx.y * LM_TX + threadIdx.x;
        #pragma unroll
          for (int s = 0; s < NS; s++)
        #pragma unroll
            for (int m = 0; m < M; m++)
        #pragma unroll
              for (int c = 0; c < 8; c++) acc[s][m][c] = 0.f;
          int K = 0;
        #pragma unroll
          for (int s = 0; s < NS; s++) K += tm[s].rank;
          for (int k0 = 0; k0 < K; k0 += KC) {
            float vb[PB], vx[PX];
        #pragma unroll
            for (int n = 0; n < PB; n++) {
              const int i = tid + n * LM_THREADS;
              const int k = k0 + (i / (8 * LM_TN)) * 8 + i % 8, j = (i / 8) % LM_TN;
              vb[n] = k < K && j0 + j < cols ? term_w<T, NS>(tm, k, j0 + j) : 0.f;
            }
        #pragma unroll
            for (int n = 0; n < PX; n++) {
              const int i = tid + n * LM_THREADS;
              const int k = k0 + (i / (8 * TM)) * 8 + i % 8, t = (i / 8) % TM;
              vx[n] = k < K && t0 + t < rows ? term_x<T, NS>(tm, k, t0 + t) : 0.f;
            }
            __syncthreads();  // the previous chunk's readers are done
        #pragma unroll
            for (int n = 0; n < PB; n++) {
              const int i = tid + n * LM_THREADS;
              const int k = (i / (8 * LM_TN)) * 8 + i % 8, j = (i / 8) % LM_TN;
              bs[k * LM_TN + ((j >> 2) & 1) * 32 + (((j >> 3) ^ (k & 7)) << 2) + (j & 3)] = vb[n];
            }
        #pragma unroll
            for (int n = 0; n < PX; n++) {
              const int i = tid + n * LM_THREADS;
              const int k = (i / (8 * TM)) * 8 + i % 8, t = (i / 8) % TM;
              xs[k * XS + t] = vx[n];
            }
            __syncthreads();
            int base = 0;
        #pragma unroll
            for (int s = 0; s < NS; s++) {
              // This term's part of the chunk.
              const int lo = base > k0 ? base - k0 : 0;
              const int end = base + tm[s].rank - k0;
              const int hi = end < KC ? end : KC;
        #pragma unroll 4
              for (int k = lo; k < hi; k++) {
                const int at = k * LM_TN + ((threadIdx.x ^ (k & 7)) << 2);
                const Pack<float, 4> b0 = *reinterpret_cast<const Pack<float, 4>*>(bs + at);
                const Pack<float, 4> b1 = *reinterpret_cast<const Pack<float, 4>*>(bs + at + 32);
                const Pack<float, M> xv = *reinterpret_cast<const Pack<float, M>*>(xs + k * XS + threadIdx.y * M);
        #pragma unroll
                for (int m = 0; m < M; m++) {
        #pragma unroll
                  for (int c = 0; c < 4; c++) {
                    acc[s][m][c] = fmaf(xv.v[m], b0.v[c], acc[s][m][c]);
                    acc[s][m][4 + c] = fmaf(xv.v[m], b1.v[c], acc[s][m][4 + c]);
                  }
                }
              }
              base += tm[s].rank;
            }
          }
        }

        // act(x) and act'(x): 0 silu, 1 gelu (tanh approximation), 2 gelu (erf).
        __device__ __forceinline__ float gate_act(int act, float x, float* dact) {
          if (act == 0) {
            const float s = lh_sigmoid(x);
            if (dact != nullptr) *dact = s * (1.f + x * (1.f - s));
            return x * s;
          }
          if (act == 1) {
            const float k = 0.7978845608028654f, c = 0.044715f;
            const float t = tanhf(k * (x + c * x * x * x));
            if (dact != nullptr) *dact = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * k * (1.f + 3.f * c * x * x);
            return 0.5f * x * (1.f + t);
          }
          const float cdf = 0.5f * (1.f + erff(x * 0.7071067811865476f));
          if (dact != nullptr) *dact = cdf + x * expf(-0.5f * x * x) * 0.3989422804014327f;
          return x * cdf;
        }

        // The row scale c (null: 1) of the thread's 8 columns.
        __device__ __forceinline__ void load_scale(const float* c, i64 col, i64 cols, float (&v)[8]) {
        #pragma unroll
          for (int k = 0; k < 8; k++) v[k] = c != nullptr && col + k < cols ? c[col + k] : 1.f;
        }

        // base + s·acc rounded to T (the composite path's addmm), or the base itself without an update.
        template <typename T>
        __device__ __forceinline__ float updated(T base, float s, float acc, int rank) {
          const float b = Cvt<T>::to(base);
          return rank > 0 ? round_to<T>(fmaf(s, acc, b)) : b;
        }

        // The tile's place: column tiles fastest.
        #define LM_TILE(M)                                                           \
          const i64 colTiles = (cols + LM_TN - 1) / LM_TN;                           \
          const i64 j0 = (static_cast<i64>(blockIdx.x) % colTiles) * LM_TN;          \
          const i64 t0 = (static_cast<i64>(blockIdx.x) / colTiles) * (LM_TY * (M));  \
          const i64 jc = j0 + threadIdx.x * 8;                                       \
          const i64 r0 = t0 + threadIdx.y * (M);

        // The staging buffers of a kernel (declared once per kernel, whichever variant of the tile function runs).
        #define LM_SHARED(M)                                                         \
          __shared__ Pack<float, 4> bs4[(128 / (M)) * LM_TN / 4];                    \
          __shared__ Pack<float, 4> xs4[(128 / (M)) * (LM_TY * (M) + 4) / 4];        \
          float* bs = reinterpret_cast<float*>(bs4);                                 \
          float* xs = reinterpret_cast<float*>(xs4);

        // S: with row scales (compiled apart: without them the scaling and its rounding cost nothing).
        template <typename T, int M, bool S>
        __device__ __forceinline__ void mlp_forward(const T* g, const T* u, const T* xa, i64 ldx, int rg, const T* bg, i64 bgj,
                                                    i64 bgk, int ru, const T* bu, i64 buj, i64 buk, float sg, float su,
                                                    const float* cg, const float* cu, T* h, i64 rows, i64 cols, int act, int vec,
                                                    float* bs, float* xs) {
          LM_TILE(M)
          // The base values first: in flight while the low-rank chunks are staged and summed.
          Pack<T, 8> gp[M], up[M];
        #pragma unroll
          for (int m = 0; m < M; m++) {
            gp[m] = load8<T>(g, r0 + m, rows, jc, cols, vec);
            up[m] = load8<T>(u, r0 + m, rows, jc, cols, vec);
          }
          const LowRankTerm<T> tm[2] = {{xa, ldx, rg, bg, bgj, bgk}, {xa + rg, ldx, ru, bu, buj, buk}};
          float acc[2][M][8];
          lowrank<T, M, 2>(acc, tm, t0, rows, j0, cols, bs, xs);
          float kg[8], ku[8];
          if (S) {
            load_scale(cg, jc, cols, kg);
            load_scale(cu, jc, cols, ku);
          }
        #pragma unroll
          for (int m = 0; m < M; m++) {
            float o[8];
        #pragma unroll
            for (int c = 0; c < 8; c++) {
              // The row-scaled outputs rounded as the in-place scaling of the tensor ops leaves them (a null scale: exact).
              float Gs = updated<T>(gp[m].v[c], sg, acc[0][m][c], rg), Us = updated<T>(up[m].v[c], su, acc[1][m][c], ru);
              if (S) {
                Gs = round_to<T>(kg[c] * Gs);
                Us = round_to<T>(ku[c] * Us);
              }
              o[c] = round_to<T>(gate_act(act, Gs, nullptr)) * Us;
            }
            store8<T>(h, r0 + m, rows, jc, cols, vec, o);
          }
        }

        // Outputs may alias inputs (dg = dh, du = u, h = g): each element is read, then written, by one thread.
        template <typename T, int M, bool S>
        __device__ __forceinline__ void mlp_backward(const T* dh, const T* xd, i64 ldd, int rd, const T* ad, i64 adj, i64 adk,
                                                     const T* g, const T* u, const T* xa, i64 ldx, int rg, const T* bg, i64 bgj,
                                                     i64 bgk, int ru, const T* bu, i64 buj, i64 buk, float sg, float su,
                                                     const float* cg, const float* cu, float* pg, float* pu, T* dg, T* du, T* h,
                                                     i64 rows, i64 cols, int act, int vec, float* bs, float* xs, float* red) {
          LM_TILE(M)
          Pack<T, 8> dp[M], gp[M], up[M];
        #pragma unroll
          for (int m = 0; m < M; m++) {
            dp[m] = load8<T>(dh, r0 + m, rows, jc, cols, vec);
            gp[m] = load8<T>(g, r0 + m, rows, jc, cols, vec);
            up[m] = load8<T>(u, r0 + m, rows, jc, cols, vec);
          }
          const LowRankTerm<T> tm[3] = {{xd, ldd, rd, ad, adj, adk}, {xa, ldx, rg, bg, bgj, bgk}, {xa + rg, ldx, ru, bu, buj, buk}};
          float acc[3][M][8];
          lowrank<T, M, 3>(acc, tm, t0, rows, j0, cols, bs, xs);
          // With row scales (as LoraRowScaleKernels' SwiGLU backward): Gs = c_g ⊙ G, Us = c_u ⊙ U rounded; dGs, dUs rounded;
          // the unscaled G, U get c ⊙ dGs, c ⊙ dUs and the scales Σ_tokens dGs ⊙ G, Σ_tokens dUs ⊙ U (without scales the
          // same formulas with c = 1 round each gradient once).
          float kg[8], ku[8], ag[8], au[8];
          if (S) {
            load_scale(cg, jc, cols, kg);
            load_scale(cu, jc, cols, ku);
          }
        #pragma unroll
          for (int c = 0; c < 8; c++) ag[c] = au[c] = 0.f;
        #pragma unroll
          for (int m = 0; m < M; m++) {
            float og[8], ou[8], oh[8];
        #pragma unroll
            for (int c = 0; c < 8; c++) {
              const float D = updated<T>(dp[m].v[c], 1.f, acc[0][m][c], rd);
              const float G = updated<T>(gp[m].v[c], sg, acc[1][m][c], rg);
              const float U = updated<T>(up[m].v[c], su, acc[2][m][c], ru);
              const float Gs = S ? round_to<T>(kg[c] * G) : G, Us = S ? round_to<T>(ku[c] * U) : U;
              float dact;
              const float a = round_to<T>(gate_act(act, Gs, &dact));
              oh[c] = a * Us;
              if (S) {
                const float dUs = round_to<T>(D * a), dGs = round_to<T>(D * Us * dact);
                ag[c] = fmaf(dGs, G, ag[c]);
                au[c] = fmaf(dUs, U, au[c]);
                og[c] = dGs * kg[c];
                ou[c] = dUs * ku[c];
              } else {
                ou[c] = D * a;
                og[c] = D * U * dact;
              }
            }
            store8<T>(dg, r0 + m, rows, jc, cols, vec, og);
            store8<T>(du, r0 + m, rows, jc, cols, vec, ou);
            if (h != nullptr) store8<T>(h, r0 + m, rows, jc, cols, vec, oh);
          }
          if (!S || (pg == nullptr && pu == nullptr)) return;  // the same for the whole block: no thread waits at the barrier below
          // Σ over the block's tokens: the 4 thread rows of a warp by shuffles (lanes 8 and 16 apart share columns), then
          // the 8 warps through shared memory; partial[token tile, column].
        #pragma unroll
          for (int c = 0; c < 8; c++) {
        #pragma unroll
            for (int o = 8; o < 32; o <<= 1) {
              ag[c] += __shfl_xor_sync(0xffffffffu, ag[c], o);
              au[c] += __shfl_xor_sync(0xffffffffu, au[c], o);
            }
          }
          if ((threadIdx.y & 3) == 0) {
        #pragma unroll
            for (int c = 0; c < 8; c++) {
              red[((threadIdx.y >> 2) * 2 + 0) * LM_TN + threadIdx.x * 8 + c] = ag[c];
              red[((threadIdx.y >> 2) * 2 + 1) * LM_TN + threadIdx.x * 8 + c] = au[c];
            }
          }
          __syncthreads();
          const int tid = threadIdx.y * LM_TX + threadIdx.x;
          if (tid < 2 * LM_TN) {
            const int which = tid / LM_TN, col = tid % LM_TN;
            float s = 0.f;
        #pragma unroll
            for (int w = 0; w < LM_TY / 4; w++) s += red[(w * 2 + which) * LM_TN + col];
            float* partial = which == 0 ? pg : pu;
            if (partial != nullptr && j0 + col < cols) partial[(t0 / (LM_TY * M)) * cols + j0 + col] = s;
          }
        }

        // out[j] = Σ_b partial[b, j] (block 32 × 8: 32 columns, 8 lanes over the partial rows).
        extern "C" __global__ void lh_lora_mlp_col_reduce(const float* __restrict__ partial, int blocks, float* __restrict__ out, i64 cols) {
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
            out[j] = total;
          }
        }

        // Two blocks of 256 threads per multiprocessor at least (registers capped at 128 per thread).
        #define LH_LORA_MLP_ENTRIES(T, S, M)                                                                                  \
          extern "C" __global__ void __launch_bounds__(256, 2) lh_lora_mlp_fwd_##S##_m##M(                                    \
              const T* g, const T* u, const T* xa, i64 ldx, int rg, const T* bg, i64 bgj, i64 bgk, int ru, const T* bu,       \
              i64 buj, i64 buk, float sg, float su, const float* cg, const float* cu, T* h, i64 rows, i64 cols, int act,      \
              int vec) {                                                                                                      \
            LM_SHARED(M)                                                                                                      \
            if (cg != nullptr || cu != nullptr)                                                                               \
              mlp_forward<T, M, true>(g, u, xa, ldx, rg, bg, bgj, bgk, ru, bu, buj, buk, sg, su, cg, cu, h, rows, cols, act,  \
                                      vec, bs, xs);                                                                           \
            else                                                                                                              \
              mlp_forward<T, M, false>(g, u, xa, ldx, rg, bg, bgj, bgk, ru, bu, buj, buk, sg, su, cg, cu, h, rows, cols, act, \
                                       vec, bs, xs);                                                                          \
          }                                                                                                                   \
          extern "C" __global__ void __launch_bounds__(256, 2) lh_lora_mlp_bwd_##S##_m##M(                                    \
              const T* dh, const T* xd, i64 ldd, int rd, const T* ad, i64 adj, i64 adk, const T* g, const T* u, const T* xa,   \
              i64 ldx, int rg, const T* bg, i64 bgj, i64 bgk, int ru, const T* bu, i64 buj, i64 buk, float sg, float su,       \
              const float* cg, const float* cu, float* pg, float* pu, T* dg, T* du, T* h, i64 rows, i64 cols, int act,        \
              int vec) {                                                                                                      \
            LM_SHARED(M)                                                                                                      \
            __shared__ float red[(LM_TY / 4) * 2 * LM_TN]; /* the row scales' partial sums of the block's 8 warps */          \
            if (cg != nullptr || cu != nullptr)                                                                               \
              mlp_backward<T, M, true>(dh, xd, ldd, rd, ad, adj, adk, g, u, xa, ldx, rg, bg, bgj, bgk, ru, bu, buj, buk, sg,  \
                                       su, cg, cu, pg, pu, dg, du, h, rows, cols, act, vec, bs, xs, red);                     \
            else                                                                                                              \
              mlp_backward<T, M, false>(dh, xd, ldd, rd, ad, adj, adk, g, u, xa, ldx, rg, bg, bgj, bgk, ru, bu, buj, buk, sg, \
                                        su, cg, cu, pg, pu, dg, du, h, rows, cols, act, vec, bs, xs, red);                    \
          }

        LH_LORA_MLP_ENTRIES(float, f32, 2)
        LH_LORA_MLP_ENTRIES(float, f32, 4)
        LH_LORA_MLP_ENTRIES(f16, f16, 2)
        LH_LORA_MLP_ENTRIES(f16, f16, 4)
        LH_LORA_MLP_ENTRIES(bf16, bf16, 2)
        LH_LORA_MLP_ENTRIES(bf16, bf16, 4)
        """;
}
