using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// CUDA kernels for the fused LoRA MLP (<see cref="LoraMlpFunction"/>, silu) that form the gate, up and down low-rank
/// updates inside the SwiGLU kernels, on tensor cores, so none of them is a separate pass over a tokens × intermediate
/// tensor (at llama-1b 4×2048 the addmm passes and the backward's recompute of h cost ~5 ms a step):
/// <list type="bullet">
/// <item>Forward: h = silu(G)·U from the base GEMM outputs g, u with G = g + s_g·xa_g·B_gᵀ, U = u + s_u·xa_u·B_uᵀ (xa: the
/// thin x·Aᵀ). G and U are never written: g and u are saved without their updates.</item>
/// <item>Backward: D = dh + dxa_d·A_d (dh = dy·W_dᵀ, dxa_d = s_d·dy·B_d), G and U recomputed as in forward; writes dG,
/// dU (the gradients of g and u too) and, where A_d needs its gradient, h for dA_d = dxa_dᵀ·h, in place: dG over dh,
/// dU over u, h over g (each element is read, then written, by one thread).</item>
/// </list>
/// G, U, D are rounded to the activations' dtype exactly where the addmm path rounds them (one rounding of base + s·Σ, the
/// Σ in fp32), then the math and rounding of the plain SwiGLU kernels (lh_swiglu_* of Kernels/fused.cu). A warp owns a
/// strip of 32 columns and walks 16-token tiles: per tile and term one mma.m16n8k16 (fp32 accumulate) per 8 columns and
/// k-step of 16 ranks, the strip's B fragments held in registers for the whole walk. The 8 columns of each mma are
/// spread so that a lane's accumulators are 8 consecutive columns of two tokens: the base values are read and the
/// results written with 16-byte accesses, without shared memory or barriers; each thread issues the loads of
/// <see cref="TilesInFlight"/> tiles before any product. Results are rounded by the paired hardware conversion
/// (cvt.rn.bf16x2/f16x2: the same bits as the SwiGLU kernels' conversions but for NaN payloads). sm_80+, bf16 and fp16
/// only (fp32 takes the addmm path), ranks 0 (no update) or multiples of 16 up to 64, widths a multiple of 8;
/// LORAHUB_LORA_MLP_KERNEL=0 turns them off (the addmm path then). A compile failure turns only these off
/// (<see cref="CompileFailure"/>).
/// </summary>
internal static class LoraMlpKernels
{
    /// <summary>Largest rank per projection taken (four k-steps of 16).</summary>
    public const long MaxRank = 64;

    private static readonly CudaProgram program = new("lora_mlp_mma.cu", Source);

    private static long forwardLaunches, backwardLaunches;

    /// <summary>Forward launches so far (tests: a silent fallback must not pass).</summary>
    public static long ForwardLaunches => Interlocked.Read(ref forwardLaunches);

    /// <summary>Backward launches so far.</summary>
    public static long BackwardLaunches => Interlocked.Read(ref backwardLaunches);

    /// <summary>Whether the kernels may be used (default on; LORAHUB_LORA_MLP_KERNEL=0: off).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL")?.Trim() != "0";

    /// <summary>Why the kernels are off after a failed compile (null: they compiled, or were not tried).</summary>
    public static string? CompileFailure => program.CompileFailure;

    /// <summary>
    /// Tokens per block, forward and backward (multiples of 16 up to 1024; LORAHUB_LORA_MLP_KERNEL_ROWS="fwd,bwd" or one
    /// value for both; default 128, 64): each warp loads its B fragments once per block. Results do not depend on it.
    /// Measured on an H200 (llama-1b, 8192 × 8192 bf16, rank 16): backward 319 µs with 64 tokens per block, 333 with 128.
    /// </summary>
    public static (int Forward, int Backward) RowsPerBlock
    {
        get => rowsPerBlock;
        set => rowsPerBlock = RowsFit(value.Forward) && RowsFit(value.Backward) ? value
            : throw new ArgumentOutOfRangeException(nameof(value), value, "16..1024, multiples of 16");
    }

    private static bool RowsFit(int rows) => rows >= 16 && rows <= 1024 && rows % 16 == 0;

    private static (int Forward, int Backward) rowsPerBlock =
        ParsePair(Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL_ROWS"), RowsFit, (128, 64));

    /// <summary>
    /// 16-token tiles whose loads each thread issues before computing, forward and backward (1 or 2; rank 16 only, higher
    /// ranks take 1; LORAHUB_LORA_MLP_KERNEL_MT="fwd,bwd" or one value for both; default 1, 1): bytes in flight against
    /// registers and blocks per multiprocessor. Results do not depend on it. Measured on an H200 (llama-1b, 8192 × 8192
    /// bf16, rank 16): forward 152 µs with 1 (64 registers, 4 blocks of 256 threads per multiprocessor), 175 with 2;
    /// backward 333 µs with 1, 395 with 2.
    /// </summary>
    public static (int Forward, int Backward) TilesInFlight
    {
        get => tilesInFlight;
        set => tilesInFlight = TilesFit(value.Forward) && TilesFit(value.Backward) ? value
            : throw new ArgumentOutOfRangeException(nameof(value), value, "1 or 2 each");
    }

    private static bool TilesFit(int tiles) => tiles is 1 or 2;

    private static (int Forward, int Backward) tilesInFlight =
        ParsePair(Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL_MT"), TilesFit, (1, 1));

    // "fwd,bwd" or one value for both; the fallback where a value is missing or does not fit.
    private static (int, int) ParsePair(string? spec, Func<int, bool> fits, (int, int) fallback)
    {
        var parts = (spec ?? "").Split(',', StringSplitOptions.TrimEntries);
        int Value(string s, int otherwise) => int.TryParse(s, out var v) && fits(v) ? v : otherwise;
        return parts.Length switch
        {
            1 => (Value(parts[0], fallback.Item1), Value(parts[0], fallback.Item2)),
            2 => (Value(parts[0], fallback.Item1), Value(parts[1], fallback.Item2)),
            _ => fallback,
        };
    }

    /// <summary>One line for logs and benchmarks: launches so far, or why the kernels are off.</summary>
    public static string Report =>
        !Enabled ? "off (LORAHUB_LORA_MLP_KERNEL=0)"
        : CompileFailure is { } why ? $"off (did not compile: {why})"
        : $"forward {ForwardLaunches}, backward {BackwardLaunches} launches";

    private static bool RankFits(long rank) => rank >= 0 && rank <= MaxRank && rank % 16 == 0;

    /// <summary>
    /// True when the kernels take the SwiGLU over the gate and up base outputs g, u (contiguous 2-D CUDA bf16/fp16 tensors
    /// of one shape, width a multiple of 8, 16-byte aligned) with updates of these ranks (0: none). They follow
    /// <see cref="torchx.nn.functional.Fused.SwiGlu"/> too (the gated-activation kernels' switch).
    /// </summary>
    public static bool Applies(string activation, Tensor g, Tensor u, long rankGate, long rankUp, long rankDown) =>
        Enabled && activation == "silu" && torchx.nn.functional.Fused.SwiGlu && Usable(g)
        && CudaKernels.ComputeCapability(DeviceIndex(g)) >= 80 // bf16 mma and paired conversions
        && g.dtype is ScalarType.BFloat16 or ScalarType.Float16 && g.dim() == 2 && g.numel() > 0 && g.size(1) % 8 == 0
        && g.is_contiguous() && u.is_contiguous() && u.dtype == g.dtype && u.shape.SequenceEqual(g.shape)
        && Aligned16(Ptr(g)) && Aligned16(Ptr(u))
        && RankFits(rankGate) && RankFits(rankUp) && RankFits(rankDown)
        && program.Compiles(DeviceIndex(g), "the LoRA MLP adds its low-rank updates by addmm instead");

    /// <summary>True when <see cref="Backward"/> takes dh (as the forward's g: contiguous, same dtype and shape, aligned).</summary>
    public static bool BackwardApplies(Tensor dh, Tensor g) =>
        dh.is_contiguous() && dh.dtype == g.dtype && dh.shape.SequenceEqual(g.shape) && Aligned16(Ptr(dh)) && SameDevice(dh, g);

    // A term's thin product xa (tokens × rank: unit column stride, even row stride, 4-byte aligned: its pairs are read as
    // 32-bit words) and its weight W(j, k) at w[j·wj + k·wk], both in the activations' dtype dt; a null pair: no update
    // (0 k-steps).
    private static KernelArgs Term(KernelArgs a, ScalarType dt, Tensor? xa, Tensor? w, long wj, long wk)
    {
        if (xa is null || w is null) return a.Ptr(IntPtr.Zero).I64(0).I32(0).Ptr(IntPtr.Zero).I64(0).I64(0);
        if (xa.dtype != dt || w.dtype != dt) throw new ArgumentException($"a low-rank term must be in the activations' dtype {dt}");
        if (xa.dim() != 2 || xa.stride(1) != 1 || xa.stride(0) % 2 != 0 || ((long)Ptr(xa) & 3) != 0)
            throw new ArgumentException("a thin product must be 2-D with unit column stride, an even row stride and 4-byte alignment");
        var rank = xa.size(1);
        if (!RankFits(rank)) throw new ArgumentException($"rank {rank} is not a multiple of 16 up to {MaxRank}");
        return a.Ptr(Ptr(xa)).I64(xa.stride(0)).I32((int)(rank / 16)).Ptr(Ptr(w)).I64(wj).I64(wk);
    }

    // B (F × r): W(j, k) = B[j, k].
    private static KernelArgs TermB(KernelArgs a, ScalarType dt, Tensor? xa, Tensor? b) =>
        b is null ? Term(a, dt, null, null, 0, 0) : Term(a, dt, xa, b, b.stride(0), b.stride(1));

    // The kernel by dtype, k-steps held per term (1, 2 or 4: a rank of 48 runs the 4-step kernel with 3) and tiles per
    // step (rank 16 only); its launch: blocks of 256 columns × `tiles` 16-token tiles (a multiple of the tiles per step).
    private static (CudaFunction kernel, Dim3 grid, int tiles) Launch(Tensor on, string op, long maxRank, int perStep, int blockRows,
        long rows, long cols)
    {
        var k = maxRank <= 16 ? 1 : maxRank <= 32 ? 2 : 4;
        var mt = k == 1 ? perStep : 1;
        var rowTiles = (rows + 15) / 16;
        var tiles = Math.Max(blockRows / 16, (int)((rowTiles + 65534) / 65535));
        tiles = (tiles + mt - 1) / mt * mt;
        var kernel = program.Function(DeviceIndex(on), $"lh_lora_mlp_mma_{op}_{Suffix(on.dtype)}_k{k}_m{mt}");
        return (kernel, new Dim3((uint)((cols + 255) / 256), (uint)((rowTiles + tiles - 1) / tiles)), tiles);
    }

    /// <summary>
    /// h = silu(g + s_g·xa_g·B_gᵀ) · (u + s_u·xa_u·B_uᵀ) for base outputs g, u (tokens × F) and thin products xa (tokens ×
    /// r); a null xa or B is no update. xa and B in the activations' dtype. Call only where <see cref="Applies"/>.
    /// </summary>
    public static Tensor Forward(Tensor g, Tensor u, Tensor? xaGate, Tensor? bGate, double scaleGate, Tensor? xaUp, Tensor? bUp, double scaleUp)
    {
        long rows = g.size(0), cols = g.size(1);
        var h = empty_like(g);
        var maxRank = Math.Max(bGate is null ? 0 : xaGate!.size(1), bUp is null ? 0 : xaUp!.size(1));
        var (kernel, grid, tiles) = Launch(g, "fwd", maxRank, tilesInFlight.Forward, rowsPerBlock.Forward, rows, cols);
        var args = new KernelArgs().Ptr(Ptr(g)).Ptr(Ptr(u));
        TermB(args, g.dtype, xaGate, bGate);
        TermB(args, g.dtype, xaUp, bUp);
        args.F32((float)scaleGate).F32((float)scaleUp).Ptr(Ptr(h)).I64(rows).I64(cols).I32(tiles);
        kernel.Launch(grid, 256, 0, args);
        Interlocked.Increment(ref forwardLaunches);
        return h;
    }

    /// <summary>
    /// Backward of <see cref="Forward"/> followed by down: from dh = dy·W_dᵀ (tokens × F, ours: overwritten), the down
    /// update's dxa_d = s_d·dy·B_d (tokens × r_d, null: none) and A_d (r_d × F), with D = dh + dxa_d·A_d: the gradients
    /// of g and u (in dh's and u's memory) and, with <paramref name="wantH"/>, h = silu(G)·U (in g's memory). g and u are
    /// consumed: the caller must not read them afterwards. Call only where <see cref="Applies"/> held in forward and
    /// <see cref="BackwardApplies"/> holds.
    /// </summary>
    public static (Tensor dg, Tensor du, Tensor? h) Backward(Tensor dh, Tensor? dxaDown, Tensor? aDown, Tensor g, Tensor u,
        Tensor? xaGate, Tensor? bGate, double scaleGate, Tensor? xaUp, Tensor? bUp, double scaleUp, bool wantH)
    {
        if (!BackwardApplies(dh, g)) throw new ArgumentException("dh must be contiguous, aligned, of g's dtype and shape");
        long rows = g.size(0), cols = g.size(1);
        var maxRank = Math.Max(aDown is null ? 0 : dxaDown!.size(1), Math.Max(bGate is null ? 0 : xaGate!.size(1), bUp is null ? 0 : xaUp!.size(1)));
        var (kernel, grid, tiles) = Launch(g, "bwd", maxRank, tilesInFlight.Backward, rowsPerBlock.Backward, rows, cols);
        // A_d (r_d × F): W(j, k) = A_d[k, j].
        var args = new KernelArgs().Ptr(Ptr(dh));
        if (aDown is null) Term(args, g.dtype, null, null, 0, 0);
        else Term(args, g.dtype, dxaDown, aDown, aDown.stride(1), aDown.stride(0));
        args.Ptr(Ptr(g)).Ptr(Ptr(u));
        TermB(args, g.dtype, xaGate, bGate);
        TermB(args, g.dtype, xaUp, bUp);
        args.F32((float)scaleGate).F32((float)scaleUp)
            // In place: dG over dh, dU over u, h over g.
            .Ptr(Ptr(dh)).Ptr(Ptr(u)).Ptr(wantH ? Ptr(g) : IntPtr.Zero)
            .I64(rows).I64(cols).I32(tiles);
        kernel.Launch(grid, 256, 0, args);
        Interlocked.Increment(ref backwardLaunches);
        return (dh, u, wantH ? g : null);
    }

    // Block: 8 warps side by side, each a strip of 32 columns (256 columns a block), walking `tiles` 16-token tiles
    // (blockIdx.y picks the block's tokens). Lane l: gid = l / 4, tig = l % 4. In the mma of n-tile q (q = 0..3) the
    // column n stands for strip column 8·(n / 2) + 2q + n % 2, so the accumulators of lane l (PTX ISA m16n8k16: c0, c1 at
    // row gid, columns 2·tig, 2·tig + 1; c2, c3 at row gid + 8) are columns 8·tig .. 8·tig + 7 of the strip at tokens
    // gid and gid + 8 of the tile: exactly the 8 elements the lane reads with one 16-byte load per token.
    private const string Source = """

        #include "lh_common.cuh"

        // d += a·b for a 16 × 16 tile a (row-major fragment) and a 16 × 8 tile b (column-major fragment), fp32 accumulate.
        template <typename T> struct Mma;
        template <> struct Mma<bf16> {
          static __device__ __forceinline__ void run(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
            asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
          }
        };
        template <> struct Mma<f16> {
          static __device__ __forceinline__ void run(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
            asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
          }
        };

        // One low-rank term: x (tokens × 16·ks, row stride ldx, unit column stride) times W (W(j, k) at w[j·wj + k·wk]).
        template <typename T>
        struct LowRank {
          const T* x;
          i64 ldx;
          int ks;
          const T* w;
          i64 wj;
          i64 wk;
        };

        // A lane's B fragments of one term (k-step s, n-tile q, register r): in registers, or in shared memory slots of its
        // own (slot i at sh[i·256]; no other thread reads them, so no barrier) where registers are scarce.
        template <int KMAX, bool SHARED> struct Frags;
        template <int KMAX> struct Frags<KMAX, false> {
          u32 b[KMAX][4][2];
          __device__ __forceinline__ void set(int s, int q, int r, u32 v) { b[s][q][r] = v; }
          __device__ __forceinline__ u32 get(int s, int q, int r) const { return b[s][q][r]; }
        };
        template <int KMAX> struct Frags<KMAX, true> {
          u32* sh;
          __device__ __forceinline__ void set(int s, int q, int r, u32 v) { sh[((s * 4 + q) * 2 + r) * 256] = v; }
          __device__ __forceinline__ u32 get(int s, int q, int r) const { return sh[((s * 4 + q) * 2 + r) * 256]; }
        };

        // The B fragments of a warp's strip (columns c0 ..): k-step s, n-tile q, registers 0 (k = 16s + 2·tig, +1) and
        // 1 (k + 8, k + 9), column n = gid of n-tile q being strip column 8·(gid / 2) + 2q + gid % 2. Zero outside the term.
        template <typename T, int KMAX, typename F>
        __device__ __forceinline__ void load_b(F& b, const LowRank<T>& t, i64 c0, i64 cols, int gid, int tig) {
          const u16* w = reinterpret_cast<const u16*>(t.w);
        #pragma unroll
          for (int s = 0; s < KMAX; s++) {
        #pragma unroll
            for (int q = 0; q < 4; q++) {
              const i64 j = c0 + 8 * (gid >> 1) + 2 * q + (gid & 1);
              const bool in = s < t.ks && j < cols;
              const i64 at = j * t.wj + static_cast<i64>(16 * s + 2 * tig) * t.wk;
              b.set(s, q, 0, in ? (static_cast<u32>(w[at]) | (static_cast<u32>(w[at + t.wk]) << 16)) : 0u);
              b.set(s, q, 1, in ? (static_cast<u32>(w[at + 8 * t.wk]) | (static_cast<u32>(w[at + 9 * t.wk]) << 16)) : 0u);
            }
          }
        }

        // Two consecutive elements of x as one 32-bit word, the lower-indexed one in the low half (the fragments' order).
        __device__ __forceinline__ u32 load_pair(const u16* p, i64 at, bool in) {
          return in ? *reinterpret_cast<const u32*>(p + at) : 0u;
        }

        // acc[q][i] = the term at the warp's 16-token tile (tokens m0 ..) and strip: Σ over its k-steps of x·Wᵀ on tensor
        // cores. Every lane of the warp must call it (mma.sync is warp-wide); only the loads are guarded.
        template <typename T, int KMAX, typename F>
        __device__ __forceinline__ void tile_product(float (&acc)[4][4], const LowRank<T>& t, const F& b, i64 m0, i64 rows, int gid,
                                                     int tig) {
        #pragma unroll
          for (int q = 0; q < 4; q++) {
        #pragma unroll
            for (int i = 0; i < 4; i++) acc[q][i] = 0.f;
          }
          const u16* x = reinterpret_cast<const u16*>(t.x);
          const i64 r0 = m0 + gid, r1 = m0 + gid + 8;
          const bool in0 = r0 < rows, in1 = r1 < rows;
        #pragma unroll
          for (int s = 0; s < KMAX; s++) {
            if (s < t.ks) {
              const i64 k = 16 * s + 2 * tig;
              u32 a[4];
              a[0] = load_pair(x, r0 * t.ldx + k, in0);
              a[1] = load_pair(x, r1 * t.ldx + k, in1);
              a[2] = load_pair(x, r0 * t.ldx + k + 8, in0);
              a[3] = load_pair(x, r1 * t.ldx + k + 8, in1);
        #pragma unroll
              for (int q = 0; q < 4; q++) Mma<T>::run(acc[q], a, b.get(s, q, 0), b.get(s, q, 1));
            }
          }
        }

        // 8 consecutive 16-bit elements as four 32-bit words, element 2i in the low half of word i (one 16-byte access);
        // kept as words so that each pair stays in one register.
        struct alignas(16) W8 {
          u32 w[4];
        };

        // 8 consecutive elements (zeros where `in` is false).
        template <typename T>
        __device__ __forceinline__ W8 load8(const T* p, i64 at, bool in) {
          W8 v = {{0u, 0u, 0u, 0u}};
          if (in) v = *reinterpret_cast<const W8*>(p + at);
          return v;
        }

        template <typename T>
        __device__ __forceinline__ void store8(T* p, i64 at, const W8& v) {
          *reinterpret_cast<W8*>(p + at) = v;
        }

        // Element c of a W8 in fp32.
        template <typename T> struct Unpack;
        template <> struct Unpack<bf16> {
          static __device__ __forceinline__ float at(const W8& v, int c) {
            const u32 w = v.w[c >> 1];
            return __uint_as_float((c & 1) ? (w & 0xffff0000u) : (w << 16));
          }
        };
        template <> struct Unpack<f16> {
          static __device__ __forceinline__ float at(const W8& v, int c) {
            const u32 w = v.w[c >> 1];
            return f16_to_float(static_cast<u16>((c & 1) ? (w >> 16) : (w & 0xffffu)));
          }
        };

        // Two fp32 values rounded to nearest even as one T pair, lo in the lower half (the lower address): one
        // cvt.rn.{bf16,f16}x2.f32 (sm_80+) instead of float_to_bf16's bit operations per value, which made such kernels
        // bound by instruction issue (the same bits for every value but NaN, which comes out canonical).
        template <typename T> struct Pair;
        template <> struct Pair<bf16> {
          static __device__ __forceinline__ u32 make(float lo, float hi) {
            u32 r;
            asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
            return r;
          }
        };
        template <> struct Pair<f16> {
          static __device__ __forceinline__ u32 make(float lo, float hi) {
            u32 r;
            asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
            return r;
          }
        };

        template <typename T>
        __device__ __forceinline__ W8 pack8(const float (&v)[8]) {
          W8 p;
        #pragma unroll
          for (int i = 0; i < 4; i++) p.w[i] = Pair<T>::make(v[2 * i], v[2 * i + 1]);
          return p;
        }

        // v rounded to T in place (the value a T tensor would hold).
        template <typename T>
        __device__ __forceinline__ void round8(float (&v)[8]) {
          const W8 p = pack8<T>(v);
        #pragma unroll
          for (int c = 0; c < 8; c++) v[c] = Unpack<T>::at(p, c);
        }

        // base + s·acc rounded to T for the lane's 8 columns of token half hf (0: gid, 1: gid + 8), as the addmm path leaves
        // it (one rounding of the fp32 value); the base itself without an update.
        template <typename T>
        __device__ __forceinline__ void add_update(W8& v, const float (&acc)[4][4], int hf, float s, int ks) {
          if (ks == 0) return;
          float f[8];
        #pragma unroll
          for (int c = 0; c < 8; c++) f[c] = fmaf(s, acc[c >> 1][2 * hf + (c & 1)], Unpack<T>::at(v, c));
          v = pack8<T>(f);
        }

        // The warp's place: strip columns c0 .., lane columns jc .. jc + 7; the block's first token mb.
        #define LM_PLACE                                                              \
          const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;                 \
          const int gid = lane >> 2, tig = lane & 3;                                  \
          const i64 c0 = static_cast<i64>(blockIdx.x) * 256 + warp * 32;              \
          if (c0 >= cols) return; /* the whole warp: no column of its strip exists */ \
          const i64 jc = c0 + 8 * tig;                                                \
          const bool colIn = jc < cols;                                               \
          const i64 mb = static_cast<i64>(blockIdx.y) * tiles * 16;

        // MT 16-token tiles per step, all their loads issued before any product (bytes in flight per thread; `tiles` is
        // a multiple of MT, so a step never reaches into the next block's tokens).
        template <typename T, int KMAX, int MT>
        __device__ __forceinline__ void mlp_forward(const T* g, const T* u, const LowRank<T>& tg, const LowRank<T>& tu, float sg,
                                                    float su, T* h, i64 rows, i64 cols, int tiles) {
          LM_PLACE
          Frags<KMAX, false> bg, bu;
          load_b<T, KMAX>(bg, tg, c0, cols, gid, tig);
          load_b<T, KMAX>(bu, tu, c0, cols, gid, tig);
          for (int t = 0; t < tiles; t += MT) {
            const i64 m0 = mb + 16 * t;
            if (m0 >= rows) break;  // the same for the whole warp
            W8 gp[MT][2], up[MT][2];
        #pragma unroll
            for (int m = 0; m < MT; m++) {
        #pragma unroll
              for (int hf = 0; hf < 2; hf++) {
                const i64 row = m0 + 16 * m + 8 * hf + gid;
                const bool in = colIn && row < rows;
                gp[m][hf] = load8<T>(g, row * cols + jc, in);
                up[m][hf] = load8<T>(u, row * cols + jc, in);
              }
            }
            float acc[4][4];
        #pragma unroll
            for (int m = 0; m < MT; m++) {
              tile_product<T, KMAX>(acc, tg, bg, m0 + 16 * m, rows, gid, tig);
              add_update<T>(gp[m][0], acc, 0, sg, tg.ks);
              add_update<T>(gp[m][1], acc, 1, sg, tg.ks);
              tile_product<T, KMAX>(acc, tu, bu, m0 + 16 * m, rows, gid, tig);
              add_update<T>(up[m][0], acc, 0, su, tu.ks);
              add_update<T>(up[m][1], acc, 1, su, tu.ks);
            }
            // As lh_swiglu_fwd: act rounded to T, the product rounded once.
        #pragma unroll
            for (int m = 0; m < MT; m++) {
        #pragma unroll
              for (int hf = 0; hf < 2; hf++) {
                const i64 row = m0 + 16 * m + 8 * hf + gid;
                float act[8], o[8];
        #pragma unroll
                for (int c = 0; c < 8; c++) {
                  const float gv = Unpack<T>::at(gp[m][hf], c);
                  act[c] = gv * lh_sigmoid(gv);
                }
                round8<T>(act);
        #pragma unroll
                for (int c = 0; c < 8; c++) o[c] = act[c] * Unpack<T>::at(up[m][hf], c);
                if (colIn && row < rows) store8<T>(h, row * cols + jc, pack8<T>(o));
              }
            }
          }
        }

        // Outputs alias inputs (dg = dh, du = u, h = g or null): each element is read, then written, by one thread. With two
        // tiles per step the B fragments live in shared memory (sh: 3·KMAX·8 slots of 256 words), or the step's 48 data
        // registers would spill.
        template <typename T, int KMAX, int MT>
        __device__ __forceinline__ void mlp_backward(const T* dh, const LowRank<T>& td, const T* g, const T* u, const LowRank<T>& tg,
                                                     const LowRank<T>& tu, float sg, float su, T* dg, T* du, T* h, i64 rows,
                                                     i64 cols, int tiles, u32* sh) {
          LM_PLACE
          constexpr bool SB = MT > 1;
          Frags<KMAX, SB> bd, bg, bu;
          if constexpr (SB) {
            bd.sh = sh + threadIdx.x;
            bg.sh = sh + KMAX * 8 * 256 + threadIdx.x;
            bu.sh = sh + 2 * KMAX * 8 * 256 + threadIdx.x;
          }
          load_b<T, KMAX>(bd, td, c0, cols, gid, tig);
          load_b<T, KMAX>(bg, tg, c0, cols, gid, tig);
          load_b<T, KMAX>(bu, tu, c0, cols, gid, tig);
          for (int t = 0; t < tiles; t += MT) {
            const i64 m0 = mb + 16 * t;
            if (m0 >= rows) break;
            W8 dp[MT][2], gp[MT][2], up[MT][2];
        #pragma unroll
            for (int m = 0; m < MT; m++) {
        #pragma unroll
              for (int hf = 0; hf < 2; hf++) {
                const i64 row = m0 + 16 * m + 8 * hf + gid;
                const bool in = colIn && row < rows;
                dp[m][hf] = load8<T>(dh, row * cols + jc, in);
                gp[m][hf] = load8<T>(g, row * cols + jc, in);
                up[m][hf] = load8<T>(u, row * cols + jc, in);
              }
            }
            float acc[4][4];
        #pragma unroll
            for (int m = 0; m < MT; m++) {
              // D = dh + dxa_d·A_d (the addmm's alpha and beta are 1).
              tile_product<T, KMAX>(acc, td, bd, m0 + 16 * m, rows, gid, tig);
              add_update<T>(dp[m][0], acc, 0, 1.f, td.ks);
              add_update<T>(dp[m][1], acc, 1, 1.f, td.ks);
              tile_product<T, KMAX>(acc, tg, bg, m0 + 16 * m, rows, gid, tig);
              add_update<T>(gp[m][0], acc, 0, sg, tg.ks);
              add_update<T>(gp[m][1], acc, 1, sg, tg.ks);
              tile_product<T, KMAX>(acc, tu, bu, m0 + 16 * m, rows, gid, tig);
              add_update<T>(up[m][0], acc, 0, su, tu.ks);
              add_update<T>(up[m][1], acc, 1, su, tu.ks);
            }
            // As lh_swiglu_bwd (and h as lh_swiglu_fwd).
        #pragma unroll
            for (int m = 0; m < MT; m++) {
        #pragma unroll
              for (int hf = 0; hf < 2; hf++) {
                const i64 row = m0 + 16 * m + 8 * hf + gid;
                float sig[8], act[8], og[8], ou[8];
        #pragma unroll
                for (int c = 0; c < 8; c++) {
                  const float gv = Unpack<T>::at(gp[m][hf], c);
                  sig[c] = lh_sigmoid(gv);
                  act[c] = gv * sig[c];
                }
                round8<T>(act);
        #pragma unroll
                for (int c = 0; c < 8; c++) {
                  const float d = Unpack<T>::at(dp[m][hf], c);
                  const float gv = Unpack<T>::at(gp[m][hf], c);
                  const float uv = Unpack<T>::at(up[m][hf], c);
                  ou[c] = d * act[c];
                  og[c] = d * uv * sig[c] * (1.f + gv * (1.f - sig[c]));
                }
                if (colIn && row < rows) {
                  const i64 at = row * cols + jc;
                  store8<T>(dg, at, pack8<T>(og));
                  store8<T>(du, at, pack8<T>(ou));
                  if (h != nullptr) {
        #pragma unroll
                    for (int c = 0; c < 8; c++) og[c] = act[c] * Unpack<T>::at(up[m][hf], c);
                    store8<T>(h, at, pack8<T>(og));
                  }
                }
              }
            }
          }
        }

        // KMAX: k-steps of 16 ranks held per term; MT: 16-token tiles per step (both compile-time: the arrays stay in
        // registers); FB, BB: blocks of 256 threads per multiprocessor the forward and backward are built for, i.e. a
        // register cap (4 blocks: 64 a thread, 3: 80, 2: 128). ptxas -v (NVRTC 11.8, sm_90) for rank 16: forward 64 / 80
        // registers with one / two tiles per step, no spill; backward 80 (16-32 bytes spilled) / 124 with the B fragments
        // in shared memory.
        #define LH_LORA_MLP_MMA_ENTRIES(T, S, KMAX, MT, FB, BB)                                                                  \
          extern "C" __global__ void __launch_bounds__(256, FB) lh_lora_mlp_mma_fwd_##S##_k##KMAX##_m##MT(                       \
              const T* g, const T* u, const T* xg, i64 ldg, int ksg, const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu,        \
              int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su, T* h, i64 rows, i64 cols, int tiles) {                 \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_forward<T, KMAX, MT>(g, u, tg, tu, sg, su, h, rows, cols, tiles);                                                \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, BB) lh_lora_mlp_mma_bwd_##S##_k##KMAX##_m##MT(                       \
              T* dh, const T* xd, i64 ldd, int ksd, const T* wd, i64 wdj, i64 wdk, T* g, T* u, const T* xg, i64 ldg, int ksg,    \
              const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu, int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su,   \
              T* dg, T* du, T* h, i64 rows, i64 cols, int tiles) {                                                               \
            const LowRank<T> td = {xd, ldd, ksd, wd, wdj, wdk};                                                                  \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            __shared__ u32 sh[MT > 1 ? 3 * KMAX * 8 * 256 : 1];                                                                  \
            mlp_backward<T, KMAX, MT>(dh, td, g, u, tg, tu, sg, su, dg, du, h, rows, cols, tiles, sh);                           \
          }

        LH_LORA_MLP_MMA_ENTRIES(bf16, bf16, 1, 1, 4, 3)
        LH_LORA_MLP_MMA_ENTRIES(bf16, bf16, 1, 2, 3, 2)
        LH_LORA_MLP_MMA_ENTRIES(bf16, bf16, 2, 1, 2, 2)
        LH_LORA_MLP_MMA_ENTRIES(bf16, bf16, 4, 1, 2, 2)
        LH_LORA_MLP_MMA_ENTRIES(f16, f16, 1, 1, 4, 3)
        LH_LORA_MLP_MMA_ENTRIES(f16, f16, 1, 2, 3, 2)
        LH_LORA_MLP_MMA_ENTRIES(f16, f16, 2, 1, 2, 2)
        LH_LORA_MLP_MMA_ENTRIES(f16, f16, 4, 1, 2, 2)
        """;
}
