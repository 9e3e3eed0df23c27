using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// CUDA kernels for LoRA projections with a per-output-row scale c (DoRA, <see cref="LowRankParts.RowScale"/>), so the
/// scales cost no extra passes over activation-sized tensors, or one vectorized pass where they cannot be folded:
/// <list type="bullet">
/// <item>SwiGLU over the row-scaled gate and up outputs of the fused MLP: the GEMMs give the unscaled g, u and the kernels
/// apply c_g, c_u on load. Forward h = silu(G)·U with G = c_g ⊙ g, U = c_u ⊙ u, each rounded to the activations' dtype as
/// the in-place scaling of the tensor ops would leave it; backward gives the gradients of the unscaled g, u (c ⊙ dG,
/// c ⊙ dU) and the scales' gradients Σ_tokens dG ⊙ g, Σ_tokens dU ⊙ u exactly from the unscaled g, u, and on request h
/// again (for A_down's gradient, instead of a second forward pass). Bits of h, dG, dU are those of the SwiGLU kernels on
/// G, U.</item>
/// <item>The forward y = c ⊙ inner + b in place for the other scaled outputs (q, k, v, down: <see cref="LowRankParts.ScaleRows_"/>),
/// with the bits of inner.mul_(c) then inner.add_(b): the tensor ops run it as a non-vectorized mixed-dtype pass (bf16
/// times fp32), ~3.5× slower than the memory allows.</item>
/// <item>The backward of y = c ⊙ inner + b for a scaled output kept as y (q, k, v, down): d(inner) = dy ⊙ c and
/// dc = Σ_tokens dy ⊙ (y − b) / c in one pass (as <see cref="LowRankParts.RowScaleGrad"/>, which takes four).</item>
/// </list>
/// fp32 partial sums per row block, then a column reduce. Each thread loads several rows before it computes
/// (<see cref="DefaultRows"/>: memory-level parallelism), and bf16 values are rounded by the paired hardware conversion
/// on sm_80+ (the same bits as lh_common's float_to_bf16 but for NaN payloads; with those bit operations the SwiGLU kernels
/// were bound by instruction issue: 179/321 µs against the plain kernels' 116/184 µs on llama-1b's 8192 × 8192). CUDA only
/// (fp32, fp16, bf16; contiguous 2-D); LORAHUB_LORA_ROWSCALE_KERNELS=0 turns them off (the tensor ops then).
/// </summary>
internal static class LoraRowScaleKernels
{
    private static readonly CudaProgram program = new("lora_row_scale.cu", Source, dependentLaunch: true);

    private static readonly Dim3 Block = new(32, 8);

    private static long launches, scaleLaunches;

    /// <summary>SwiGLU and row-scale backward calls that ran the kernels so far (tests: a silent fallback must not pass).</summary>
    public static long Launches => Interlocked.Read(ref launches);

    /// <summary>Row-scale forward calls (<see cref="ScaleRows_"/>) that ran the kernel so far.</summary>
    public static long ScaleLaunches => Interlocked.Read(ref scaleLaunches);

    /// <summary>Whether the kernels may be used (default on; LORAHUB_LORA_ROWSCALE_KERNELS=0: off).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LORA_ROWSCALE_KERNELS")?.Trim() != "0";

    /// <summary>
    /// Rows each thread loads before computing any of them (1, 2 or 4; null: each kernel's default,
    /// <see cref="DefaultRows"/>). Results do not depend on it, the scales' gradients included (each thread still sums its
    /// rows in order). Tests and measurements set it.
    /// </summary>
    public static int? RowsInFlight
    {
        get => rowsInFlight;
        set => rowsInFlight = value is null or 1 or 2 or 4 ? value : throw new ArgumentOutOfRangeException(nameof(value), value, "1, 2 or 4");
    }

    private static int? rowsInFlight;

    /// <summary>
    /// Rows in flight per thread of each kernel ("sswiglu_fwd", "sswiglu_bwd", "sswiglu_bwdh" (the backward that writes h),
    /// "rowscale_fwd", "rowscale_bwd"): the fastest measured on an H200 with llama-1b's bf16 shapes (Nsight Compute, µs for
    /// R = 1 / 2 / 4): SwiGLU 8192 × 8192 forward 109 / 113 / 118 (32 blocks per SM), backward 196 / 201 / 186, backward
    /// writing h 220 / 222 / 287; row scale 8192 × 2048 (512) forward 17.9 / 17.2 / 17.5 (7.4 / 6.7 / 7.4; 8 blocks per SM),
    /// backward 25.4 / 29.1 / 28.1 (9.6 / 10.9 / 10.9). The tensor ops took 72 (21) µs for the forward, the plain SwiGLU
    /// kernels 115 / 183 µs, these kernels before 179 / 321 µs.
    /// </summary>
    public static int DefaultRows(string op) => op switch
    {
        "sswiglu_bwd" => 4,
        "rowscale_fwd" => 2,
        _ => 1,
    };

    /// <summary>
    /// Blocks per multiprocessor the grids of the kernels without column sums (the forwards) aim at (null: each kernel's
    /// default, <see cref="ForwardBlocks"/>; the backwards take 8, as their partial sums grow with the grid). Results do
    /// not depend on it. Tests and measurements set it.
    /// </summary>
    public static int? ForwardBlocksPerSm { get; set; }

    /// <summary>
    /// Blocks per multiprocessor of a forward's grid: 32 for the scaled SwiGLU (many short blocks: 109 against 118 µs with
    /// 8 at one row in flight), 8 for the row scale (6.7 against 8.8 µs for 8192 × 512; 17.2 against 17.6 for 8192 × 2048).
    /// </summary>
    public static int ForwardBlocks(string op) => ForwardBlocksPerSm ?? (op == "sswiglu_fwd" ? 32 : 8);

    /// <summary>True when the SwiGLU kernels apply to the gate and up outputs g, u (silu, CUDA, contiguous 2-D, one dtype).</summary>
    public static bool Applies(string activation, Tensor g, Tensor u) =>
        Enabled && activation == "silu" && torchx.nn.functional.Fused.SwiGlu && Usable(g) && g.dim() == 2 && g.numel() > 0
        && g.is_contiguous() && u.is_contiguous() && u.dtype == g.dtype && u.shape.SequenceEqual(g.shape) && Compiles(DeviceIndex(g));

    /// <summary>True when the row-scale backward kernel applies to the gradient dy (rows × cols) of a scaled output.</summary>
    public static bool AppliesTo(Tensor dy) => Enabled && Usable(dy) && dy.dim() == 2 && dy.numel() > 0 && Compiles(DeviceIndex(dy));

    /// <summary>
    /// True when <see cref="ScaleRows_"/> applies: inner (rows × cols) contiguous on CUDA, c and the bias (or null) of
    /// cols elements, fp32/fp16/bf16 on its device (an fp64 c or bias makes the tensor ops compute in fp64).
    /// </summary>
    public static bool AppliesToScale(Tensor inner, Tensor c, Tensor? bias) =>
        Enabled && Usable(inner) && inner.dim() == 2 && inner.numel() > 0 && inner.is_contiguous() && PerColumn(c, inner)
        && (bias is null || PerColumn(bias, inner)) && Compiles(DeviceIndex(inner));

    private static bool PerColumn(Tensor t, Tensor of) => t.dim() == 1 && t.size(0) == of.size(1) && Supported(t.dtype) && SameDevice(t, of);

    /// <summary>Why these kernels are off after a failed compile (null: they compiled, or were not tried).</summary>
    public static string? CompileFailure => program.CompileFailure;

    private static bool Compiles(int device) => program.Compiles(device, "DoRA's row scales run as tensor ops instead");

    // About perSm blocks of 256 threads per multiprocessor over all column tiles.
    private static int RowBlocks(Tensor on, long rows, long nvec, int perSm = 8)
    {
        long sms = CudaKernels.MultiprocessorCount(DeviceIndex(on));
        var tiles = Math.Max(1, (nvec + 31) / 32);
        var by = Math.Min((rows + 7) / 8, Math.Max(1, perSm * sms / tiles));
        return (int)Math.Clamp(by, 1, 65535);
    }

    // fp32 contiguous (exact from fp16/bf16); the tensor itself when it already is one (no new handle on the hot path).
    private static Tensor? F32(Tensor? c) =>
        c is null ? null : c.dtype == ScalarType.Float32 && c.is_contiguous() ? c : c.to(ScalarType.Float32).contiguous();

    private static (string suffix, long nvec) Layout(Tensor g, params Tensor[] others)
    {
        var cols = g.size(1);
        var v = VectorWidth(g.dtype);
        var vec = cols % v == 0 && Aligned16(Ptr(g)) && others.All(t => Aligned16(Ptr(t)));
        return ($"{Suffix(g.dtype)}_{(vec ? "v" : "1")}", vec ? cols / v : cols);
    }

    private static CudaFunction Kernel(Tensor on, string op, string suffix) =>
        program.Function(DeviceIndex(on), $"lh_lora_{op}_{suffix}_r{rowsInFlight ?? DefaultRows(op)}");

    /// <summary>
    /// inner ← c ⊙ inner + b in place (rows × cols; c, b per column, b null: none), bit for bit what inner.mul_(c) then
    /// inner.add_(b) give: the product in fp32 rounded to inner's dtype, then the sum rounded again. Call only where
    /// <see cref="AppliesToScale"/>.
    /// </summary>
    public static void ScaleRows_(Tensor inner, Tensor c, Tensor? bias)
    {
        using var scope = NewDisposeScope();
        var (c32, b32) = (F32(c)!, F32(bias));
        var rows = inner.size(0);
        var (suffix, nvec) = Layout(inner);
        Kernel(inner, "rowscale_fwd", suffix)
            .Launch(new Dim3((uint)((nvec + 31) / 32), (uint)RowBlocks(inner, rows, nvec, ForwardBlocks("rowscale_fwd"))), Block, 0,
                new KernelArgs().Ptr(Ptr(inner)).Ptr(Ptr(c32)).Ptr(b32 is null ? IntPtr.Zero : Ptr(b32)).I64(rows).I64(nvec));
        Interlocked.Increment(ref scaleLaunches);
    }

    /// <summary>h = silu(c_g ⊙ g)·(c_u ⊙ u) for the unscaled g, u (rows × cols); a null scale is 1. Call only where <see cref="Applies"/>.</summary>
    public static Tensor SwiGluForward(Tensor g, Tensor u, Tensor? cg, Tensor? cu)
    {
        using var scope = NewDisposeScope();
        var h = empty_like(g);
        var (cg32, cu32) = (F32(cg), F32(cu));
        var rows = g.size(0);
        var (suffix, nvec) = Layout(g, u, h);
        Kernel(g, "sswiglu_fwd", suffix)
            .Launch(new Dim3((uint)((nvec + 31) / 32), (uint)RowBlocks(g, rows, nvec, ForwardBlocks("sswiglu_fwd"))), Block, 0,
                new KernelArgs().Ptr(Ptr(g)).Ptr(Ptr(u)).Ptr(cg32 is null ? IntPtr.Zero : Ptr(cg32)).Ptr(cu32 is null ? IntPtr.Zero : Ptr(cu32))
                    .Ptr(Ptr(h)).I64(rows).I64(nvec));
        Interlocked.Increment(ref launches);
        return h.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// From dh = ∂L/∂h: the gradients of the unscaled g and u, and those of the scales (fp32, null for a null scale).
    /// With <paramref name="h"/> (rows × cols, g's dtype, contiguous) the pass also writes h itself there, with the bits of
    /// <see cref="SwiGluForward"/> (one more write instead of a forward pass that reads g and u again, for a caller that
    /// needs h in backward). With <paramref name="gateDivisor"/> (<paramref name="upDivisor"/>; cols, fp32) the gate's
    /// (up's) scale gradient comes divided by it, in the same launch: for c = m/n with n detached (DoRA: c = m/‖V‖) that is
    /// m's gradient, with the bits autograd's division backward gives.
    /// </summary>
    public static (Tensor dg, Tensor du, Tensor? dcg, Tensor? dcu) SwiGluBackward(Tensor dh, Tensor g, Tensor u, Tensor? cg, Tensor? cu,
        Tensor? h = null, Tensor? gateDivisor = null, Tensor? upDivisor = null)
    {
        using var scope = NewDisposeScope();
        var d = dh.dtype == g.dtype ? dh.contiguous() : dh.to(g.dtype).contiguous();
        var dg = empty_like(g);
        var du = empty_like(u);
        var (cg32, cu32) = (F32(cg), F32(cu));
        long rows = g.size(0), cols = g.size(1);
        var (suffix, nvec) = h is null ? Layout(g, u, d, dg, du) : Layout(g, u, d, dg, du, h);
        var blocks = RowBlocks(g, rows, nvec);
        var pg = cg32 is null ? null : empty([blocks, cols], ScalarType.Float32, g.device);
        var pu = cu32 is null ? null : empty([blocks, cols], ScalarType.Float32, g.device);
        IntPtr P(Tensor? t) => t is null ? IntPtr.Zero : Ptr(t);
        Kernel(g, h is null ? "sswiglu_bwd" : "sswiglu_bwdh", suffix)
            .Launch(new Dim3((uint)((nvec + 31) / 32), (uint)blocks), Block, 0,
                new KernelArgs().Ptr(Ptr(d)).Ptr(Ptr(g)).Ptr(Ptr(u)).Ptr(P(cg32)).Ptr(P(cu32)).Ptr(Ptr(dg)).Ptr(Ptr(du)).Ptr(P(h))
                    .Ptr(P(pg)).Ptr(P(pu)).I64(rows).I64(nvec));
        Tensor? Reduce(Tensor? partial, Tensor? then) =>
            partial is null ? null : ColumnSums(partial, blocks, cols, then: F32(then)).MoveToOuterDisposeScope();
        var (dcg, dcu) = (Reduce(pg, gateDivisor), Reduce(pu, upDivisor));
        Interlocked.Increment(ref launches);
        return (dg.MoveToOuterDisposeScope(), du.MoveToOuterDisposeScope(), dcg, dcu);
    }

    /// <summary>
    /// Whether <see cref="RowScaleBackward"/> sums the scale's gradient inside its kernel (the last block of each column
    /// tile, the same bits as the separate reduce; one launch less per scaled projection in backward) rather than by
    /// lh_lora_col_reduce after it. Default off (LORAHUB_LORA_ROWSCALE_FUSED_REDUCE=1: on): on an H200 (llama-1b DoRA r16
    /// 4×2048, session 7's final call) the step was faster with the separate reduce, 80,953 against 80,097 tok/s.
    /// </summary>
    public static bool FusedColumnReduce { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LORA_ROWSCALE_FUSED_REDUCE")?.Trim() == "1";

    // Per device: the row-scale backward's tickets (int32, one per column tile, zero between launches: the last block of a
    // tile resets its own). Kernels run in order on the legacy stream, so one launch at a time uses them; they only grow.
    private static readonly Dictionary<int, Tensor> tickets = new();

    private static IntPtr Tickets(Tensor on, long count)
    {
        lock (tickets)
        {
            var device = DeviceIndex(on);
            if (!tickets.TryGetValue(device, out var t) || t.numel() < count)
            {
                t?.Dispose();
                tickets[device] = t = zeros([Math.Max(count, 1L << 10)], ScalarType.Int32, on.device).DetachFromDisposeScope();
            }
            return Ptr(t);
        }
    }

    /// <summary>
    /// Σ over the rows of <paramref name="partial"/> (blocks × cols, fp32, contiguous, CUDA) in a fixed order, in one launch;
    /// with <paramref name="divisor"/> (cols, fp32) that sum divided by it, 0 where it is 0 (the where/eq/zeros_like/div of
    /// the tensor ops were four more launches per projection in backward); with <paramref name="then"/> (cols, fp32) the
    /// result divided by it once more (m's gradient for c = m/then, DoRA: one launch where a sum and a div_ take two).
    /// For kernels that leave per-block column sums of a scale's gradient (the row-scale and MLP kernels).
    /// </summary>
    internal static Tensor ColumnSums(Tensor partial, int blocks, long cols, Tensor? divisor = null, Tensor? then = null)
    {
        var sum = empty([cols], ScalarType.Float32, partial.device);
        program.Function(DeviceIndex(partial), "lh_lora_col_reduce")
            .Launch((int)((cols + 31) / 32), new Dim3(32, 32), 0,
                new KernelArgs().Ptr(Ptr(partial)).I32(blocks).Ptr(divisor is null ? IntPtr.Zero : Ptr(divisor))
                    .Ptr(then is null ? IntPtr.Zero : Ptr(then)).Ptr(Ptr(sum)).I64(cols));
        return sum;
    }

    /// <summary>
    /// For y = c ⊙ inner + b (rows × cols, kept as <paramref name="y"/>; null when c needs no gradient): d(inner) = dy ⊙ c
    /// and, with y, dc = Σ_rows dy ⊙ (y − b) / c (fp32; 0 where c = 0, as DoRA's output kernel), in one pass. With
    /// <paramref name="divisor"/> (cols) dc comes divided by it in the same launch: for c = m/n with n detached (DoRA) m's
    /// gradient, with the bits of autograd's division backward applied to dc.
    /// </summary>
    public static (Tensor dInner, Tensor? dc) RowScaleBackward(Tensor dy, Tensor? y, Tensor c, Tensor? bias, Tensor? divisor = null)
    {
        using var scope = NewDisposeScope();
        // No new handles where the tensors already fit (this runs for every scaled projection of every backward).
        var g = dy.is_contiguous() ? dy : dy.contiguous();
        var yc = y is null ? null : y.dtype != g.dtype ? y.to(g.dtype).contiguous() : y.is_contiguous() ? y : y.contiguous();
        var d = empty_like(g);
        var c32 = F32(c)!;
        var b = yc is not null && bias is not null ? bias.to(g.dtype).contiguous() : null;
        long rows = g.size(0), cols = g.size(1);
        var (suffix, nvec) = yc is null ? Layout(g, d) : Layout(g, d, yc);
        var blocks = RowBlocks(g, rows, nvec);
        var tiles = (nvec + 31) / 32;
        var partial = yc is null ? null : empty([blocks, cols], ScalarType.Float32, g.device);
        // dc summed by the kernel's last block per column tile (FusedColumnReduce), or by lh_lora_col_reduce after it.
        var fused = partial is not null && FusedColumnReduce;
        var then = F32(divisor);
        var dc = fused ? empty([cols], ScalarType.Float32, g.device) : null;
        var tickets = fused ? Tickets(g, tiles) : IntPtr.Zero;
        Kernel(g, "rowscale_bwd", suffix)
            .Launch(new Dim3((uint)tiles, (uint)blocks), Block, 0,
                new KernelArgs().Ptr(Ptr(g)).Ptr(yc is null ? IntPtr.Zero : Ptr(yc)).Ptr(Ptr(c32)).Ptr(b is null ? IntPtr.Zero : Ptr(b))
                    .Ptr(Ptr(d)).Ptr(partial is null ? IntPtr.Zero : Ptr(partial)).I64(rows).I64(nvec)
                    .Ptr(fused && then is not null ? Ptr(then) : IntPtr.Zero).Ptr(dc is null ? IntPtr.Zero : Ptr(dc)).Ptr(tickets));
        if (partial is not null && !fused) dc = ColumnSums(partial, blocks, cols, c32, then);
        Interlocked.Increment(ref launches);
        return (d.MoveToOuterDisposeScope(), dc?.MoveToOuterDisposeScope());
    }

    // Blocks of 32 × 8 threads: 32 column vectors (16 bytes each where the data allows) by 8 rows; grid.y blocks stride down
    // the rows (as DoRA's output kernels). Each thread loads R rows (r, r + stride, …) before computing any of them, so R
    // times the bytes are in flight per thread; per thread the rows are still taken in order, so sums do not depend on R.
    // A null scale pointer means 1 (and no partial sums for it).
    private const string Source = """
        #include "lh_common.cuh"

        #define LH_TILE_X 32
        #define LH_ROWS_Y 8

        // N fp32 values rounded to T in place (the value a T tensor would hold, back in fp32); bf16 a pair at a time
        // (lh_round_pair; rounding each value alone, these kernels were bound by instruction issue, not memory). Stores
        // round through lh_common's lh_round_pack.
        template <typename T, int N>
        struct Rounding {
          static __device__ __forceinline__ void all(float (&v)[N]) {
        #pragma unroll
            for (int k = 0; k < N; k++) v[k] = round_to<T>(v[k]);
          }
        };
        template <int N>
        struct Rounding<bf16, N> {
          static __device__ __forceinline__ void all(float (&v)[N]) {
        #pragma unroll
            for (int k = 0; k + 1 < N; k += 2) {
              const u32 r = lh_round_pair<bf16>(v[k], v[k + 1]);
              v[k] = __uint_as_float(r << 16);
              v[k + 1] = __uint_as_float(r & 0xffff0000u);
            }
            if (N % 2 == 1) v[N - 1] = round_to<bf16>(v[N - 1]);
          }
        };

        // The N per-column fp32 values of column pack vc; `absent` where p is null.
        template <int N>
        __device__ __forceinline__ void column_values(const float* __restrict__ p, i64 vc, float (&v)[N], float absent) {
        #pragma unroll
          for (int k = 0; k < N; k++) v[k] = p != nullptr ? p[vc * N + k] : absent;
        }

        // x ← c ⊙ x + b in place (b null: none), as x.mul_(c) then x.add_(b) leave it: the fp32 product rounded to T, then
        // the fp32 sum rounded again. __fmul_rn/__fadd_rn: the product must not be contracted into an FMA with the add (an
        // fp32 x would then be rounded once where the tensor ops round twice).
        template <typename T, int N, int R>
        __device__ __forceinline__ void rowscale_forward(T* __restrict__ x, const float* __restrict__ c, const float* __restrict__ b,
                                                         i64 rows, i64 nvec) {
          const i64 vc = static_cast<i64>(blockIdx.x) * LH_TILE_X + threadIdx.x;
          if (vc >= nvec) return;
          float cc[N], bb[N];
          column_values<N>(c, vc, cc, 1.f);
          column_values<N>(b, vc, bb, 0.f);
          const i64 step = static_cast<i64>(gridDim.y) * LH_ROWS_Y;
          for (i64 r0 = static_cast<i64>(blockIdx.y) * LH_ROWS_Y + threadIdx.y; r0 < rows; r0 += R * step) {
            Pack<T, N> xp[R];
        #pragma unroll
            for (int j = 0; j < R; j++) {
              const i64 r = r0 + j * step;
              if (r < rows) xp[j] = load_pack<T, N>(x, r * nvec + vc);
            }
        #pragma unroll
            for (int j = 0; j < R; j++) {
              const i64 r = r0 + j * step;
              if (r < rows) {
                float v[N];
        #pragma unroll
                for (int k = 0; k < N; k++) v[k] = __fmul_rn(Cvt<T>::to(xp[j].v[k]), cc[k]);
                if (b != nullptr) {
                  Rounding<T, N>::all(v);
        #pragma unroll
                  for (int k = 0; k < N; k++) v[k] = __fadd_rn(v[k], bb[k]);
                }
                store_pack<T, N>(x, r * nvec + vc, lh_round_pack<T, N>(v));
              }
            }
          }
        }

        // P: elements computed together (a pair: one paired rounding each, and fewer values live than all N at once).
        template <typename T, int N, int R, int P = (N % 2 == 0 ? 2 : 1)>
        __device__ __forceinline__ void sswiglu_forward(const T* __restrict__ g, const T* __restrict__ u, const float* __restrict__ cg,
                                                        const float* __restrict__ cu, T* __restrict__ h, i64 rows, i64 nvec) {
          const i64 vc = static_cast<i64>(blockIdx.x) * LH_TILE_X + threadIdx.x;
          if (vc >= nvec) return;
          float sg[N], su[N];
          column_values<N>(cg, vc, sg, 1.f);
          column_values<N>(cu, vc, su, 1.f);
          const i64 step = static_cast<i64>(gridDim.y) * LH_ROWS_Y;
          for (i64 r0 = static_cast<i64>(blockIdx.y) * LH_ROWS_Y + threadIdx.y; r0 < rows; r0 += R * step) {
            Pack<T, N> gp[R], up[R];
        #pragma unroll
            for (int j = 0; j < R; j++) {
              const i64 r = r0 + j * step;
              if (r < rows) {
                gp[j] = load_pack<T, N>(g, r * nvec + vc);
                up[j] = load_pack<T, N>(u, r * nvec + vc);
              }
            }
        #pragma unroll
            for (int j = 0; j < R; j++) {
              const i64 r = r0 + j * step;
              if (r < rows) {
                float o[N];
        #pragma unroll
                for (int k0 = 0; k0 < N; k0 += P) {
                  float G[P], U[P], a[P];
        #pragma unroll
                  for (int q = 0; q < P; q++) {
                    G[q] = sg[k0 + q] * Cvt<T>::to(gp[j].v[k0 + q]);
                    U[q] = su[k0 + q] * Cvt<T>::to(up[j].v[k0 + q]);
                  }
                  Rounding<T, P>::all(G);
                  Rounding<T, P>::all(U);
        #pragma unroll
                  for (int q = 0; q < P; q++) a[q] = G[q] * lh_sigmoid(G[q]);
                  Rounding<T, P>::all(a);
        #pragma unroll
                  for (int q = 0; q < P; q++) o[k0 + q] = a[q] * U[q];
                }
                store_pack<T, N>(h, r * nvec + vc, lh_round_pack<T, N>(o));
              }
            }
          }
        }

        // WithH: h = silu(G)·U written too, as sswiglu_forward gives it (a separate instantiation: the values it keeps live
        // cost the plain one registers).
        template <typename T, int N, int R, bool WithH, int P = (N % 2 == 0 ? 2 : 1)>
        __device__ __forceinline__ void sswiglu_backward(const T* __restrict__ dh, const T* __restrict__ g, const T* __restrict__ u,
                                                         const float* __restrict__ cg, const float* __restrict__ cu,
                                                         T* __restrict__ dg, T* __restrict__ du, T* __restrict__ h,
                                                         float* __restrict__ pg, float* __restrict__ pu, i64 rows, i64 nvec) {
          __shared__ float red[2][LH_ROWS_Y][LH_TILE_X * N];
          const i64 vc = static_cast<i64>(blockIdx.x) * LH_TILE_X + threadIdx.x;
          const bool active = vc < nvec;
          float ag[N], au[N];
        #pragma unroll
          for (int k = 0; k < N; k++) {
            ag[k] = 0.f;
            au[k] = 0.f;
          }
          if (active) {
            float sg[N], su[N];
            column_values<N>(cg, vc, sg, 1.f);
            column_values<N>(cu, vc, su, 1.f);
            const i64 step = static_cast<i64>(gridDim.y) * LH_ROWS_Y;
            for (i64 r0 = static_cast<i64>(blockIdx.y) * LH_ROWS_Y + threadIdx.y; r0 < rows; r0 += R * step) {
              Pack<T, N> dp[R], gp[R], up[R];
        #pragma unroll
              for (int j = 0; j < R; j++) {
                const i64 r = r0 + j * step;
                if (r < rows) {
                  dp[j] = load_pack<T, N>(dh, r * nvec + vc);
                  gp[j] = load_pack<T, N>(g, r * nvec + vc);
                  up[j] = load_pack<T, N>(u, r * nvec + vc);
                }
              }
        #pragma unroll
              for (int j = 0; j < R; j++) {
                const i64 r = r0 + j * step;
                if (r < rows) {
                  float og[N], ou[N], oh[N];
        #pragma unroll
                  for (int k0 = 0; k0 < N; k0 += P) {
                    float G[P], U[P], s[P], act[P], dG[P], dU[P];
        #pragma unroll
                    for (int q = 0; q < P; q++) {
                      G[q] = sg[k0 + q] * Cvt<T>::to(gp[j].v[k0 + q]);
                      U[q] = su[k0 + q] * Cvt<T>::to(up[j].v[k0 + q]);
                    }
                    Rounding<T, P>::all(G);
                    Rounding<T, P>::all(U);
        #pragma unroll
                    for (int q = 0; q < P; q++) {
                      s[q] = lh_sigmoid(G[q]);
                      act[q] = G[q] * s[q];
                    }
                    Rounding<T, P>::all(act);
        #pragma unroll
                    for (int q = 0; q < P; q++) {
                      const float d = Cvt<T>::to(dp[j].v[k0 + q]);
                      dU[q] = d * act[q];
                      dG[q] = d * U[q] * s[q] * (1.f + G[q] * (1.f - s[q]));
                    }
                    Rounding<T, P>::all(dU);
                    Rounding<T, P>::all(dG);
        #pragma unroll
                    for (int q = 0; q < P; q++) {
                      ag[k0 + q] = fmaf(dG[q], Cvt<T>::to(gp[j].v[k0 + q]), ag[k0 + q]);
                      au[k0 + q] = fmaf(dU[q], Cvt<T>::to(up[j].v[k0 + q]), au[k0 + q]);
                      og[k0 + q] = dG[q] * sg[k0 + q];
                      ou[k0 + q] = dU[q] * su[k0 + q];
                      if (WithH) oh[k0 + q] = act[q] * U[q];
                    }
                  }
                  store_pack<T, N>(dg, r * nvec + vc, lh_round_pack<T, N>(og));
                  store_pack<T, N>(du, r * nvec + vc, lh_round_pack<T, N>(ou));
                  if (WithH) store_pack<T, N>(h, r * nvec + vc, lh_round_pack<T, N>(oh));
                }
              }
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
              const i64 at = static_cast<i64>(blockIdx.y) * nvec * N + vc * N + k;
              if (pg != nullptr) pg[at] = sgk;
              if (pu != nullptr) pu[at] = suk;
            }
          }
        }

        // d = dy·c; with y, per-block column sums of dy·(y − b) into partial[blockIdx.y, :] (partial null: y is null too).
        // With tickets (one per column tile, zero between launches: the last block resets its own) the block that finishes
        // a column tile last also reduces the tile's partial sums into dc as lh_lora_col_reduce does (the same sums in the
        // same order: the same bits), saving that launch.
        template <typename T, int N, int R>
        __device__ __forceinline__ void rowscale_backward(const T* __restrict__ dy, const T* __restrict__ y, const float* __restrict__ c,
                                                          const T* __restrict__ bias, T* __restrict__ d, float* __restrict__ partial,
                                                          i64 rows, i64 nvec, const float* __restrict__ then, float* __restrict__ dc,
                                                          u32* __restrict__ tickets) {
          __shared__ float red[LH_ROWS_Y][LH_TILE_X * N];
          __shared__ u32 last_block;
          const i64 vc = static_cast<i64>(blockIdx.x) * LH_TILE_X + threadIdx.x;
          const bool active = vc < nvec;
          float acc[N];
        #pragma unroll
          for (int k = 0; k < N; k++) acc[k] = 0.f;
          if (active) {
            float cc[N], bb[N];
            column_values<N>(c, vc, cc, 1.f);
        #pragma unroll
            for (int k = 0; k < N; k++) bb[k] = bias != nullptr ? Cvt<T>::to(bias[vc * N + k]) : 0.f;
            const i64 step = static_cast<i64>(gridDim.y) * LH_ROWS_Y;
            for (i64 r0 = static_cast<i64>(blockIdx.y) * LH_ROWS_Y + threadIdx.y; r0 < rows; r0 += R * step) {
              Pack<T, N> gp[R], yp[R];
        #pragma unroll
              for (int j = 0; j < R; j++) {
                const i64 r = r0 + j * step;
                if (r < rows) {
                  gp[j] = load_pack<T, N>(dy, r * nvec + vc);
                  if (y != nullptr) yp[j] = load_pack<T, N>(y, r * nvec + vc);
                }
              }
        #pragma unroll
              for (int j = 0; j < R; j++) {
                const i64 r = r0 + j * step;
                if (r < rows) {
                  float o[N];
        #pragma unroll
                  for (int k = 0; k < N; k++) o[k] = Cvt<T>::to(gp[j].v[k]) * cc[k];
                  store_pack<T, N>(d, r * nvec + vc, lh_round_pack<T, N>(o));
                  if (y != nullptr) {
        #pragma unroll
                    for (int k = 0; k < N; k++) acc[k] = fmaf(Cvt<T>::to(gp[j].v[k]), Cvt<T>::to(yp[j].v[k]) - bb[k], acc[k]);
                  }
                }
              }
            }
          }
          if (partial == nullptr) return;  // the same for the whole block: no thread waits at the barrier below
        #pragma unroll
          for (int k = 0; k < N; k++) red[threadIdx.y][threadIdx.x * N + k] = acc[k];
          __syncthreads();
          if (threadIdx.y == 0 && active) {
            float* out = partial + static_cast<i64>(blockIdx.y) * nvec * N + vc * N;
        #pragma unroll
            for (int k = 0; k < N; k++) {
              float s = 0.f;
        #pragma unroll
              for (int j = 0; j < LH_ROWS_Y; j++) s += red[j][threadIdx.x * N + k];
              out[k] = s;
            }
          }
          if (tickets == nullptr) return;  // the same for the whole block
          __threadfence();  // the partials are visible device-wide before the ticket says so
          __syncthreads();
          if (threadIdx.x == 0 && threadIdx.y == 0) last_block = atomicAdd(&tickets[blockIdx.x], 1u) == gridDim.y - 1;
          __syncthreads();
          if (!last_block) return;
          __threadfence();
          const i64 cols = nvec * N;
          const int t = threadIdx.y * LH_TILE_X + threadIdx.x;
          const i64 j = static_cast<i64>(blockIdx.x) * LH_TILE_X * N + t;
          if (t < LH_TILE_X * N && j < cols) {
            // lh_lora_col_reduce's order: 32 lanes' sums of every 32nd partial row (lane l: rows l, l + 32, … in order),
            // then those in lane order. The 32 sums are kept side by side, so a round of 32 rows is 32 independent loads
            // (L2: the partials of other blocks, not this SM's L1).
            const int blocks = static_cast<int>(gridDim.y);
            float lane_sum[32];
        #pragma unroll
            for (int l = 0; l < 32; l++) lane_sum[l] = 0.f;
            int b = 0;
            for (; b + 32 <= blocks; b += 32) {
        #pragma unroll
              for (int l = 0; l < 32; l++) lane_sum[l] += __ldcg(partial + static_cast<i64>(b + l) * cols + j);
            }
        #pragma unroll
            for (int l = 0; l < 32; l++) {
              if (b + l < blocks) lane_sum[l] += __ldcg(partial + static_cast<i64>(b + l) * cols + j);
            }
            float total = 0.f;
        #pragma unroll
            for (int l = 0; l < 32; l++) total += lane_sum[l];
            const float r = c[j] != 0.f ? total / c[j] : 0.f;
            dc[j] = then == nullptr ? r : r / then[j];
          }
          if (threadIdx.x == 0 && threadIdx.y == 0) tickets[blockIdx.x] = 0;  // ready for the next launch
        }

        // out[j] = Σ_b partial[b, j] (block 32 × 32: 32 columns, 32 lanes over the partial rows, whose sums are then added
        // in lane order; 32 × 8 lanes took 10 µs for k/v's 528 partial rows of 512 columns); with div, that sum / div[j]
        // (IEEE division, as the tensor ops), 0 where div[j] is 0; with then, the result / then[j] (a second IEEE division).
        extern "C" __global__ void lh_lora_col_reduce(const float* __restrict__ partial, int blocks, const float* __restrict__ div,
                                                      const float* __restrict__ then, float* __restrict__ out, i64 cols) { lh_grid_dependency_sync();
          __shared__ float tile[32][33];
          const i64 j = static_cast<i64>(blockIdx.x) * 32 + threadIdx.x;
          float s = 0.f;
          if (j < cols) {
        #pragma unroll 4
            for (int b = threadIdx.y; b < blocks; b += 32) s += partial[static_cast<i64>(b) * cols + j];
          }
          tile[threadIdx.y][threadIdx.x] = s;
          __syncthreads();
          if (threadIdx.y == 0 && j < cols) {
            float total = 0.f;
        #pragma unroll
            for (int i = 0; i < 32; i++) total += tile[i][threadIdx.x];
            const float r = div == nullptr ? total : div[j] != 0.f ? total / div[j] : 0.f;
            out[j] = then == nullptr ? r : r / then[j];
          }
        }

        #define LH_WIDTH_1(T) 1
        #define LH_WIDTH_v(T) (16 / sizeof(T))

        #define LH_ROWSCALE_ENTRIES(T, S, V, R)                                                                            \
          extern "C" __global__ void lh_lora_sswiglu_fwd_##S##_##V##_r##R(const T* g, const T* u, const float* cg,         \
                                                                          const float* cu, T* h, i64 rows, i64 nvec) { lh_grid_dependency_sync();    \
            sswiglu_forward<T, LH_WIDTH_##V(T), R>(g, u, cg, cu, h, rows, nvec);                                          \
          }                                                                                                               \
          extern "C" __global__ void lh_lora_sswiglu_bwd_##S##_##V##_r##R(const T* dh, const T* g, const T* u,            \
                                                                          const float* cg, const float* cu, T* dg, T* du, \
                                                                          T* h, float* pg, float* pu, i64 rows, i64 nvec) { lh_grid_dependency_sync(); \
            sswiglu_backward<T, LH_WIDTH_##V(T), R, false>(dh, g, u, cg, cu, dg, du, h, pg, pu, rows, nvec);              \
          }                                                                                                               \
          extern "C" __global__ void lh_lora_sswiglu_bwdh_##S##_##V##_r##R(const T* dh, const T* g, const T* u,           \
                                                                           const float* cg, const float* cu, T* dg,       \
                                                                           T* du, T* h, float* pg, float* pu, i64 rows,   \
                                                                           i64 nvec) { lh_grid_dependency_sync();                                    \
            sswiglu_backward<T, LH_WIDTH_##V(T), R, true>(dh, g, u, cg, cu, dg, du, h, pg, pu, rows, nvec);               \
          }                                                                                                               \
          extern "C" __global__ void lh_lora_rowscale_fwd_##S##_##V##_r##R(T* x, const float* c, const float* b, i64 rows, \
                                                                           i64 nvec) { lh_grid_dependency_sync();                                    \
            rowscale_forward<T, LH_WIDTH_##V(T), R>(x, c, b, rows, nvec);                                                 \
          }                                                                                                               \
          extern "C" __global__ void lh_lora_rowscale_bwd_##S##_##V##_r##R(const T* dy, const T* y, const float* c,       \
                                                                           const T* bias, T* d, float* partial, i64 rows, \
                                                                           i64 nvec, const float* then, float* dc,        \
                                                                           u32* tickets) { lh_grid_dependency_sync();                                \
            rowscale_backward<T, LH_WIDTH_##V(T), R>(dy, y, c, bias, d, partial, rows, nvec, then, dc, tickets);          \
          }

        // Every rows-in-flight choice the launchers offer (RowsInFlight).
        #define LH_ROWSCALE_ALL(T, S, V)  \
          LH_ROWSCALE_ENTRIES(T, S, V, 1) \
          LH_ROWSCALE_ENTRIES(T, S, V, 2) \
          LH_ROWSCALE_ENTRIES(T, S, V, 4)

        LH_ROWSCALE_ALL(float, f32, 1)
        LH_ROWSCALE_ALL(float, f32, v)
        LH_ROWSCALE_ALL(f16, f16, 1)
        LH_ROWSCALE_ALL(f16, f16, v)
        LH_ROWSCALE_ALL(bf16, bf16, 1)
        LH_ROWSCALE_ALL(bf16, bf16, v)
        """;
}
