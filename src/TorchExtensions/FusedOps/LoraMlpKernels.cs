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
/// Σ in fp32), then the math and rounding of the plain SwiGLU kernels (lh_swiglu_* of Kernels/fused.cu; by default the
/// pipelined kernels at rank 16 take an approximate sigmoid, <see cref="FastSigmoid"/>). A warp owns a
/// strip of 32 columns and walks 16-token tiles: per tile and term one mma.m16n8k16 (fp32 accumulate) per 8 columns and
/// k-step of 16 ranks, the strip's B fragments held in registers for the whole walk. The 8 columns of each mma are
/// spread so that a lane's accumulators are 8 consecutive columns of two tokens: the base values are read and the
/// results written with 16-byte accesses, without barriers. Two schemes, the same bits (<see cref="Stages"/>): the
/// register kernels, where each thread issues the loads of <see cref="TilesInFlight"/> tiles before any product, and the
/// pipelined kernels (the default), where each warp streams its tiles through shared memory slots of its own with
/// cp.async, a tile or two ahead of the one it computes (reads in flight during the math, no registers held for them),
/// and keeps the updated D, G, U there between the products; they also apply DoRA's gate/up row scales
/// (<see cref="RowScalesEnabled"/>). Results are rounded by the paired hardware conversion (cvt.rn.bf16x2/f16x2: the same
/// bits as the SwiGLU kernels' conversions but for NaN payloads); a product of two rounded values (h = act·U, dU = D·act)
/// is one packed fma with −0 per pair in the pipelined kernels (exact products, one rounding: the same bits). sm_80+,
/// bf16 and fp16 only (fp32 takes the addmm path), ranks 0 (no update) or multiples of 16 up to 64, widths a multiple of
/// 8; LORAHUB_LORA_MLP_KERNEL=0 turns them off (the addmm path then). A compile failure turns only these off
/// (<see cref="CompileFailure"/>; one of the pipelined kernels only those, <see cref="PipelinedCompileFailure"/>).
/// </summary>
internal static class LoraMlpKernels
{
    /// <summary>Largest rank per projection taken (four k-steps of 16).</summary>
    public const long MaxRank = 64;

    private static readonly CudaProgram program = new("lora_mlp_mma.cu", Helpers + "\n" + RegisterKernels);

    // The pipelined kernels, a program of their own: a compile failure there leaves the register kernels on.
    private static readonly CudaProgram pipelinedProgram = new("lora_mlp_mma_pipe.cu", Helpers + "\n" + PipelinedKernels);

    private static long forwardLaunches, backwardLaunches;

    /// <summary>Forward launches so far (tests: a silent fallback must not pass).</summary>
    public static long ForwardLaunches => Interlocked.Read(ref forwardLaunches);

    /// <summary>Backward launches so far.</summary>
    public static long BackwardLaunches => Interlocked.Read(ref backwardLaunches);

    private static long pipelinedLaunches;

    /// <summary>Launches of the pipelined kernels (forward and backward) so far (<see cref="Stages"/>).</summary>
    public static long PipelinedLaunches => Interlocked.Read(ref pipelinedLaunches);

    /// <summary>Whether the kernels may be used (default on; LORAHUB_LORA_MLP_KERNEL=0: off).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL")?.Trim() != "0";

    /// <summary>Why the kernels are off after a failed compile (null: they compiled, or were not tried).</summary>
    public static string? CompileFailure => program.CompileFailure;

    /// <summary>
    /// Whether DoRA's MLP (row scales on gate/up) takes these kernels too, its scales applied on load and their gradients
    /// summed in the backward pass (<see cref="RowScalesApply"/>; default on; LORAHUB_LORA_MLP_KERNEL_ROWSCALE=0: off, the
    /// scaled SwiGLU kernels of <see cref="LoraRowScaleKernels"/> with the addmm passes). Measured on an H200 (llama-1b DoRA
    /// r16 4×2048): 99.6 ms a step instead of 101.4.
    /// </summary>
    public static bool RowScalesEnabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL_ROWSCALE")?.Trim() != "0";

    /// <summary>Why the pipelined kernels are off after a failed compile (the register kernels run instead; null: they
    /// compiled, or were not tried).</summary>
    public static string? PipelinedCompileFailure => pipelinedProgram.CompileFailure;

    /// <summary>
    /// Stages of the pipelined kernels, forward and backward (0: the register kernels, <see cref="TilesInFlight"/>; 2 or 3:
    /// each warp streams its tiles through shared memory with cp.async, stages − 1 tiles ahead of the one it computes;
    /// LORAHUB_LORA_MLP_KERNEL_STAGES="fwd,bwd" or one value for both; default 2, 2). The same bits either way. Measured on
    /// an H200 (llama-1b, 8192 × 8192 bf16, rank 16): forward 154.6 µs with the register kernels, 134.4 with 2 stages,
    /// 140.0 with 3; backward (64 tokens per block) 309.8, 282.8 and 302.3; in a training step (timeline) forward 164 →
    /// 153.5 µs and backward 350 → 255 µs a layer. Nsight Compute: the forward is bound by instruction issue (~45
    /// instructions an element, 81% of issue slots busy; the exact sigmoid alone is ~20), the backward runs at ~70% of DRAM
    /// bandwidth. Only the pipelined kernels carry DoRA's row scales and <see cref="FastSigmoid"/>.
    /// </summary>
    public static (int Forward, int Backward) Stages
    {
        get => stages;
        set => stages = StagesFit(value.Forward) && StagesFit(value.Backward) ? value
            : throw new ArgumentOutOfRangeException(nameof(value), value, "0, 2 or 3 each");
    }

    private static bool StagesFit(int n) => n is 0 or 2 or 3;

    /// <summary>
    /// Blocks of 256 threads per multiprocessor the pipelined backward at rank 16 is built for: 3 (80 registers a thread,
    /// the default) or 4 (64, with a few values spilled to local memory); LORAHUB_LORA_MLP_KERNEL_BWD_BLOCKS. The same bits.
    /// </summary>
    public static int BackwardBlocksPerSm
    {
        get => backwardBlocks;
        set => backwardBlocks = value is 3 or 4 ? value : throw new ArgumentOutOfRangeException(nameof(value), value, "3 or 4");
    }

    private static int backwardBlocks =
        int.TryParse(Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL_BWD_BLOCKS"), out var b) && b is 3 or 4 ? b : 3;

    private static (int Forward, int Backward) stages =
        ParsePair(Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL_STAGES"), StagesFit, (2, 2));

    /// <summary>
    /// Whether the pipelined kernels at rank 16 with two stages take the hardware's approximate exponential and reciprocal
    /// for the sigmoid (default on; LORAHUB_LORA_MLP_KERNEL_FAST_SIGMOID=0: the exact kernels): fewer instructions per element,
    /// but h, dg, du may then differ from the SwiGLU kernels' by one ulp of the activations' dtype here and there (the
    /// exponential is the one the cross-entropy kernel already takes; tests hold it to the composite ops within bf16
    /// rounding, and 50 training steps end on the unfused path's loss within bf16 noise, bench/README.md). Measured on an H200
    /// (8192 × 8192 bf16, rank 16): forward 134 → 111 µs (29 instructions an element instead of 45, at the plain SwiGLU
    /// kernel's 113 µs), backward ~250 → 231 µs; with DoRA's row scales ~199 → 121 and ~356 → 294 µs; llama-1b LoRA step
    /// 96.6 → 95.9 ms.
    /// </summary>
    public static bool FastSigmoid { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL_FAST_SIGMOID")?.Trim() != "0";

    /// <summary>
    /// Tokens per block, forward and backward (multiples of 16 up to 1024, or 0: the pipelined kernels take as many as
    /// fill the GPU with one wave of blocks, the register kernels 128 and 64; LORAHUB_LORA_MLP_KERNEL_ROWS="fwd,bwd" or one
    /// value for both; default 128, 64): each warp loads its B fragments (and fills its pipeline) once per block. Results
    /// do not depend on it. Measured on an H200 (llama-1b, 8192 × 8192 bf16, rank 16, register kernels): backward 319 µs
    /// with 64 tokens per block, 333 with 128.
    /// </summary>
    public static (int Forward, int Backward) RowsPerBlock
    {
        get => rowsPerBlock;
        set => rowsPerBlock = RowsFit(value.Forward) && RowsFit(value.Backward) ? value
            : throw new ArgumentOutOfRangeException(nameof(value), value, "0 or 16..1024, multiples of 16");
    }

    private static bool RowsFit(int rows) => rows == 0 || rows >= 16 && rows <= 1024 && rows % 16 == 0;

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
        : $"forward {ForwardLaunches}, backward {BackwardLaunches} launches ({PipelinedLaunches} pipelined, stages {stages.Forward},{stages.Backward}"
          + (FastSigmoid ? ", fast sigmoid" : "")
          + (PipelinedCompileFailure is { } pipe ? $"; pipelined kernels did not compile: {pipe})" : ")");

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

    // The kernel by dtype, k-steps held per term (1, 2 or 4: a rank of 48 runs the 4-step kernel with 3), and either the
    // pipelined kernel of `stages` stages (its dynamic shared memory: stages · tensors · 8 KiB) or the register kernel of
    // `perStep` tiles per step (rank 16 only); its launch: blocks of 256 columns × `tiles` 16-token tiles (a multiple of
    // the tiles per step).
    private static (CudaFunction kernel, Dim3 grid, int tiles, int shared) Launch(Tensor on, string op, long maxRank, int perStep,
        int stages, int blockRows, long rows, long cols, bool rowScales = false)
    {
        var k = maxRank <= 16 ? 1 : maxRank <= 32 ? 2 : 4;
        var device = DeviceIndex(on);
        // Row scales only in the pipelined kernels (two stages where the register kernels are chosen).
        if (rowScales && stages == 0) stages = 2;
        var pipelined = stages > 0 && pipelinedProgram.Compiles(device, "the LoRA MLP takes its register kernels instead");
        if (rowScales && !pipelined) throw new InvalidOperationException("row scales need the pipelined kernels (see RowScalesApply)");
        var mt = k == 1 && !pipelined ? perStep : 1;
        var rowTiles = (rows + 15) / 16;
        // The stages (tensors × 8 KiB each) and, in the backward with row scales, 16 KiB of per-thread sums.
        var shared = pipelined ? stages * (op == "fwd" ? 2 : 3) * 8192 + (rowScales && op == "bwd" ? 16384 : 0) : 0;
        var xBlocks = (cols + 255) / 256;
        if (blockRows == 0 && !pipelined) blockRows = op == "fwd" ? 128 : 64;
        var tiles = Math.Max(blockRows == 0 ? OneWaveTiles(device, BlocksPerSm(op, k, rowScales), shared, rowTiles, xBlocks) : blockRows / 16,
            (int)((rowTiles + 65534) / 65535));
        tiles = (tiles + mt - 1) / mt * mt;
        var grid = new Dim3((uint)xBlocks, (uint)((rowTiles + tiles - 1) / tiles));
        if (!pipelined)
            return (program.Function(device, $"lh_lora_mlp_mma_{op}_{Suffix(on.dtype)}_k{k}_m{mt}"), grid, tiles, 0);
        var variant = op == "bwd" && k == 1 && !rowScales && backwardBlocks == 4 ? "_b4"
            : FastSigmoid && k == 1 && stages == 2 ? "_fs" : "";
        var kernel = pipelinedProgram.Function(device, $"lh_lora_mlp_mma_{op}{(rowScales ? "_rs" : "")}_{Suffix(on.dtype)}_k{k}_s{stages}{variant}");
        kernel.AllowDynamicSharedMemory(shared);
        Interlocked.Increment(ref pipelinedLaunches);
        return (kernel, grid, tiles, shared);
    }

    // Blocks per multiprocessor a pipelined kernel is built for (its __launch_bounds__: the register cap).
    private static int BlocksPerSm(string op, int k, bool rowScales) =>
        op == "fwd" ? k == 1 ? 4 : 2
        : k == 1 ? rowScales ? 3 : backwardBlocks : 2;

    // CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR.
    private const int AttrSharedPerSm = 81;

    // 16-token tiles per block such that the grid's blocks all run at once (one wave): blocks per multiprocessor as the
    // registers allow and the shared memory (1 KiB of it reserved per block), times the multiprocessors, over the column
    // blocks.
    private static int OneWaveTiles(int device, int blocksPerSm, int shared, long rowTiles, long xBlocks)
    {
        var bySmem = CudaDriver.Attribute(device, AttrSharedPerSm) / (shared + 1024);
        var slots = (long)Math.Max(1, Math.Min(blocksPerSm, bySmem)) * CudaKernels.MultiprocessorCount(device);
        var yBlocks = Math.Max(1, slots / xBlocks);
        return (int)Math.Max(1, (rowTiles + yBlocks - 1) / yBlocks);
    }

    /// <summary>
    /// True when DoRA's row scales of gate and up (<paramref name="cGate"/>, <paramref name="cUp"/>: one per column of g,
    /// null: none) can go into the kernels too (<see cref="Forward"/>'s and <see cref="Backward"/>'s scale arguments): the
    /// pipelined kernels compile and each scale is a 1-D tensor of g's width on its device. Check <see cref="Applies"/>
    /// as well.
    /// </summary>
    public static bool RowScalesApply(Tensor g, Tensor? cGate, Tensor? cUp) =>
        Enabled && ScaleFits(cGate, g) && ScaleFits(cUp, g) && Usable(g)
        && pipelinedProgram.Compiles(DeviceIndex(g), "DoRA's MLP takes the scaled SwiGLU kernels instead");

    private static bool ScaleFits(Tensor? c, Tensor g) =>
        c is null || c.dim() == 1 && c.size(0) == g.size(1) && Supported(c.dtype) && SameDevice(c, g);

    // fp32, contiguous and 16-byte aligned, as the kernels read the scales (the tensor itself when it already is).
    private static Tensor? F32(Tensor? c) =>
        c is null ? null
        : c.dtype == ScalarType.Float32 && c.is_contiguous() ? Aligned16(Ptr(c)) ? c : c.clone()
        : c.to(ScalarType.Float32).contiguous();

    /// <summary>
    /// h = silu(g + s_g·xa_g·B_gᵀ) · (u + s_u·xa_u·B_uᵀ) for base outputs g, u (tokens × F) and thin products xa (tokens ×
    /// r); a null xa or B is no update. xa and B in the activations' dtype. With DoRA's row scales c (one per column;
    /// null: none) G = c_g ⊙ (g + s_g·xa_g·B_gᵀ) and U likewise, each product rounded as the scaled SwiGLU kernels round
    /// it after the addmm path. Call only where <see cref="Applies"/> (and <see cref="RowScalesApply"/> with scales).
    /// </summary>
    public static Tensor Forward(Tensor g, Tensor u, Tensor? xaGate, Tensor? bGate, double scaleGate, Tensor? xaUp, Tensor? bUp, double scaleUp,
        Tensor? cGate = null, Tensor? cUp = null)
    {
        using var scope = NewDisposeScope();
        long rows = g.size(0), cols = g.size(1);
        var h = empty_like(g);
        var scaled = cGate is not null || cUp is not null;
        var (cg, cu) = (F32(cGate), F32(cUp));
        var maxRank = Math.Max(bGate is null ? 0 : xaGate!.size(1), bUp is null ? 0 : xaUp!.size(1));
        var (kernel, grid, tiles, shared) = Launch(g, "fwd", maxRank, tilesInFlight.Forward, stages.Forward, rowsPerBlock.Forward, rows, cols, scaled);
        var args = new KernelArgs().Ptr(Ptr(g)).Ptr(Ptr(u));
        TermB(args, g.dtype, xaGate, bGate);
        TermB(args, g.dtype, xaUp, bUp);
        args.F32((float)scaleGate).F32((float)scaleUp);
        if (scaled) args.Ptr(cg is null ? IntPtr.Zero : Ptr(cg)).Ptr(cu is null ? IntPtr.Zero : Ptr(cu));
        args.Ptr(Ptr(h)).I64(rows).I64(cols).I32(tiles);
        kernel.Launch(grid, 256, shared, args);
        Interlocked.Increment(ref forwardLaunches);
        return h.MoveToOuterDisposeScope();
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
        var (dg, du, h, _, _) = Backward(dh, dxaDown, aDown, g, u, xaGate, bGate, scaleGate, xaUp, bUp, scaleUp, wantH, null, null);
        return (dg, du, h);
    }

    /// <summary>
    /// <see cref="Backward(Tensor, Tensor?, Tensor?, Tensor, Tensor, Tensor?, Tensor?, double, Tensor?, Tensor?, double, bool)"/>
    /// with DoRA's row scales of gate and up as in <see cref="Forward"/> (null: none): dg, du are then the gradients of the
    /// unscaled (updated) g and u, dG·c_g and dU·c_u with dG, dU rounded first (as the scaled SwiGLU kernels), and, where
    /// <paramref name="gateScaleGrad"/> (<paramref name="upScaleGrad"/>), the scale's gradient Σ_tokens dG ⊙ (g + s_g·xa_g·B_gᵀ)
    /// (fp32; per-block sums of the kernel, then one sum over blocks), divided by <paramref name="gateDivisor"/>
    /// (<paramref name="upDivisor"/>) where given: for c = m/n that is m's gradient, as autograd's division backward gives it.
    /// </summary>
    public static (Tensor dg, Tensor du, Tensor? h, Tensor? dcGate, Tensor? dcUp) Backward(Tensor dh, Tensor? dxaDown, Tensor? aDown,
        Tensor g, Tensor u, Tensor? xaGate, Tensor? bGate, double scaleGate, Tensor? xaUp, Tensor? bUp, double scaleUp, bool wantH,
        Tensor? cGate, Tensor? cUp, bool gateScaleGrad = false, bool upScaleGrad = false, Tensor? gateDivisor = null,
        Tensor? upDivisor = null)
    {
        if (!BackwardApplies(dh, g)) throw new ArgumentException("dh must be contiguous, aligned, of g's dtype and shape");
        using var scope = NewDisposeScope();
        long rows = g.size(0), cols = g.size(1);
        var scaled = cGate is not null || cUp is not null;
        var (cg, cu) = (F32(cGate), F32(cUp));
        var maxRank = Math.Max(aDown is null ? 0 : dxaDown!.size(1), Math.Max(bGate is null ? 0 : xaGate!.size(1), bUp is null ? 0 : xaUp!.size(1)));
        var (kernel, grid, tiles, shared) = Launch(g, "bwd", maxRank, tilesInFlight.Backward, stages.Backward, rowsPerBlock.Backward, rows, cols, scaled);
        // A_d (r_d × F): W(j, k) = A_d[k, j].
        var args = new KernelArgs().Ptr(Ptr(dh));
        if (aDown is null) Term(args, g.dtype, null, null, 0, 0);
        else Term(args, g.dtype, dxaDown, aDown, aDown.stride(1), aDown.stride(0));
        args.Ptr(Ptr(g)).Ptr(Ptr(u));
        TermB(args, g.dtype, xaGate, bGate);
        TermB(args, g.dtype, xaUp, bUp);
        args.F32((float)scaleGate).F32((float)scaleUp);
        Tensor? pg = null, pu = null;
        if (scaled)
        {
            // Per-block sums (blocks × F, fp32) of the scales' gradients; dG, dU go over dh and u (no pointers for them).
            pg = cg is not null && gateScaleGrad ? empty([grid.Y, cols], ScalarType.Float32, g.device) : null;
            pu = cu is not null && upScaleGrad ? empty([grid.Y, cols], ScalarType.Float32, g.device) : null;
            IntPtr P(Tensor? t) => t is null ? IntPtr.Zero : Ptr(t);
            args.Ptr(P(cg)).Ptr(P(cu)).Ptr(wantH ? Ptr(g) : IntPtr.Zero).Ptr(P(pg)).Ptr(P(pu));
        }
        // In place: dG over dh, dU over u, h over g.
        else args.Ptr(Ptr(dh)).Ptr(Ptr(u)).Ptr(wantH ? Ptr(g) : IntPtr.Zero);
        args.I64(rows).I64(cols).I32(tiles);
        kernel.Launch(grid, 256, shared, args);
        Interlocked.Increment(ref backwardLaunches);
        // Σ over the blocks (and ÷ n) in one launch each where the row-scale kernels run, else sum, then divide.
        Tensor? Reduce(Tensor? partial, Tensor? n) =>
            partial is null ? null
            : LoraRowScaleKernels.AppliesTo(partial) ? LoraRowScaleKernels.ColumnSums(partial, (int)grid.Y, cols, then: F32(n))
            : n is null ? partial.sum(dim: 0) : partial.sum(dim: 0).div_(n);
        var dcg = Reduce(pg, gateDivisor)?.MoveToOuterDisposeScope();
        var dcu = Reduce(pu, upDivisor)?.MoveToOuterDisposeScope();
        return (dh, u, wantH ? g : null, dcg, dcu);
    }

    // Block: 8 warps side by side, each a strip of 32 columns (256 columns a block), walking `tiles` 16-token tiles
    // (blockIdx.y picks the block's tokens). Lane l: gid = l / 4, tig = l % 4. In the mma of n-tile q (q = 0..3) the
    // column n stands for strip column 8·(n / 2) + 2q + n % 2, so the accumulators of lane l (PTX ISA m16n8k16: c0, c1 at
    // row gid, columns 2·tig, 2·tig + 1; c2, c3 at row gid + 8) are columns 8·tig .. 8·tig + 7 of the strip at tokens
    // gid and gid + 8 of the tile: exactly the 8 elements the lane reads with one 16-byte load per token.
    // What both programs share: the mma, the B and A fragments, 16-byte packs, rounding, the warp's place.
    private const string Helpers = """

        #include "lh_common.cuh"
        #include "lh_mma.cuh"  // Mma<T>::run (mma.m16n8k16, fp32 accumulate), W8, shared_address, cp.async helpers

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

        // W8 (lh_mma.cuh): 8 consecutive 16-bit elements as four 32-bit words, element 2i in the low half of word i (one
        // 16-byte access); kept as words so that each pair stays in one register.

        // 8 consecutive elements (zeros where `in` is false).
        template <typename T>
        __device__ __forceinline__ W8 load8(const T* p, i64 at, bool in) {
          W8 v = {{0u, 0u, 0u, 0u}};
          if (in) v = *reinterpret_cast<const W8*>(p + at);
          return v;
        }

        // One 16-byte store (st.global.v4): a plain struct store compiled to four 32-bit ones (NVRTC 11.8, sm_90),
        // four times the store instructions and partial-sector writes.
        template <typename T>
        __device__ __forceinline__ void store8(T* p, i64 at, const W8& v) {
          asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p + at), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]), "r"(v.w[3])
                       : "memory");
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
        """;

    // The register kernels: each thread holds the loads of its tiles in registers (LORAHUB_LORA_MLP_KERNEL_STAGES=0).
    private const string RegisterKernels = """
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

    // The pipelined kernels (LORAHUB_LORA_MLP_KERNEL_STAGES=2 or 3): each warp streams its tiles through shared memory
    // with cp.async, S − 1 tiles ahead of the one it computes, so DRAM reads stay in flight during the math without
    // registers held for them. A lane copies, then reads back, only its own 16-byte slots (slot (warp, stage, tensor,
    // half, lane); a warp's 32 slots are 512 consecutive bytes: no bank conflict), so no barrier is needed. The thin
    // products' A fragments of a tile are loaded before waiting for its copies (ranks up to 32 in forward, 16 in
    // backward; registers). Per element the same operations in the same order as the register kernels: the same bits.
    private const string PipelinedKernels = """
        // The stages (cp.async: copy16_async, commit_async, wait_async of lh_mma.cuh).
        extern __shared__ W8 lm_stages[];

        // A lane's A fragments of one term at a 16-token tile (tokens m0 ..): k-step s, registers as the mma takes them.
        template <int KMAX> struct AFrags {
          u32 a[KMAX][4];
        };

        template <typename T, int KMAX>
        __device__ __forceinline__ void load_a(AFrags<KMAX>& f, const LowRank<T>& t, i64 m0, i64 rows, int gid, int tig) {
          const u16* x = reinterpret_cast<const u16*>(t.x);
          const i64 r0 = m0 + gid, r1 = m0 + gid + 8;
          const bool in0 = r0 < rows, in1 = r1 < rows;
        #pragma unroll
          for (int s = 0; s < KMAX; s++) {
            const i64 k = 16 * s + 2 * tig;
            const bool live = s < t.ks;
            f.a[s][0] = load_pair(x, r0 * t.ldx + k, live && in0);
            f.a[s][1] = load_pair(x, r1 * t.ldx + k, live && in1);
            f.a[s][2] = load_pair(x, r0 * t.ldx + k + 8, live && in0);
            f.a[s][3] = load_pair(x, r1 * t.ldx + k + 8, live && in1);
          }
        }

        // acc = the term at the tile (as tile_product: the same mma's in the same order). Warp-wide.
        template <typename T, int KMAX, typename F>
        __device__ __forceinline__ void mma_tile(float (&acc)[4][4], const AFrags<KMAX>& f, const F& b, int ks) {
        #pragma unroll
          for (int q = 0; q < 4; q++) {
        #pragma unroll
            for (int i = 0; i < 4; i++) acc[q][i] = 0.f;
          }
        #pragma unroll
          for (int s = 0; s < KMAX; s++) {
            if (s < ks) {
        #pragma unroll
              for (int q = 0; q < 4; q++) Mma<T>::run(acc[q], f.a[s], b.get(s, q, 0), b.get(s, q, 1));
            }
          }
        }

        // DoRA's row scales c (fp32, one per column, 16-byte aligned; null: 1) of the lane's 8 columns, read where used
        // (two 16-byte loads, L1 hits after the first tile: volatile, so that they are not hoisted into 8 registers held
        // across the walk).
        __device__ __forceinline__ void load_scales(float (&v)[8], const float* c, i64 jc, bool colIn) {
          if (c != nullptr && colIn) {
            asm volatile("ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3]) : "l"(c + jc));
            asm volatile("ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v[4]), "=f"(v[5]), "=f"(v[6]), "=f"(v[7]) : "l"(c + jc + 4));
          } else {
        #pragma unroll
            for (int k = 0; k < 8; k++) v[k] = 1.f;
          }
        }

        // Four floats (one 16-byte shared access).
        struct alignas(16) F4 {
          float v[4];
        };

        // v ← c ⊙ v rounded to T (the product in fp32, as the scaled SwiGLU kernels of LoraRowScaleKernels).
        template <typename T>
        __device__ __forceinline__ void scale8(W8& v, const float (&c)[8]) {
          float f[8];
        #pragma unroll
          for (int k = 0; k < 8; k++) f[k] = c[k] * Unpack<T>::at(v, k);
          v = pack8<T>(f);
        }

        // The sigmoid: as lh_sigmoid (the SwiGLU kernels' bits), or with FS the hardware's approximate 2^x and reciprocal
        // (ex2/rcp.approx: a few ulp of fp32, so a rounded result can differ from the SwiGLU kernels' by one ulp of T).
        template <bool FS>
        __device__ __forceinline__ float sigmoid_of(float x) {
          if constexpr (FS) {
            float e, r;
            asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x * -1.4426950408889634f));
            asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.f + e));
            return r;
          } else {
            return lh_sigmoid(x);
          }
        }

        // a·b for two T pairs rounded once to T (a fused multiply-add with −0: the product of two 16-bit values is exact in
        // fp32, so this is the bits of multiplying in fp32 and rounding, as the register kernels do, in one instruction per
        // pair instead of two unpacks, a multiply and half a conversion per element; bf16 could differ only where the
        // product is below fp32's normal range).
        template <typename T> struct Mul2;
        template <> struct Mul2<bf16> {
          static __device__ __forceinline__ u32 run(u32 a, u32 b) {
            u32 d;
            asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
            return d;
          }
        };
        template <> struct Mul2<f16> {
          static __device__ __forceinline__ u32 run(u32 a, u32 b) {
            u32 d;
            asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
            return d;
          }
        };

        template <typename T>
        __device__ __forceinline__ W8 mul8(const W8& a, const W8& b) {
          W8 d;
        #pragma unroll
          for (int i = 0; i < 4; i++) d.w[i] = Mul2<T>::run(a.w[i], b.w[i]);
          return d;
        }

        // The block's tiles that hold tokens.
        __device__ __forceinline__ int tiles_here(i64 mb, i64 rows, int tiles) {
          const i64 left = (rows - mb + 15) / 16;
          return left < tiles ? static_cast<int>(left) : tiles;
        }

        // NT tensors' 16-byte pieces of tile t (both token halves) into stage t % S of the lane's slots (shared address
        // of its first: slot), as one group (an empty one past the block's tiles, so that groups and tiles keep counting
        // together).
        template <typename T, int NT, int S>
        __device__ __forceinline__ void issue_tile(u32 slot, const T* const (&src)[NT], int t, int nt, i64 mb, i64 rows, i64 cols,
                                                   i64 jc, bool colIn, int gid) {
          if (t < nt) {
            const u32 st = slot + (t % S) * NT * 64 * 16;
        #pragma unroll
            for (int hf = 0; hf < 2; hf++) {
              const i64 row = mb + 16 * t + 8 * hf + gid;
              const bool in = colIn && row < rows;
              const i64 at = in ? row * cols + jc : 0;
        #pragma unroll
              for (int n = 0; n < NT; n++) copy16_async(st + (2 * n + hf) * 32 * 16, src[n] + at, in);
            }
          }
          commit_async();
        }

        // RS: DoRA's row scales cg, cu (null: none) applied to the updated g and u on load (G = c_g ⊙ (g + s_g·xa_g·B_gᵀ),
        // each rounding as the scaled SwiGLU kernels do after the addmm path).
        template <typename T, int KMAX, int S, bool RS, bool FS = false>
        __device__ __forceinline__ void mlp_forward_pipelined(const T* g, const T* u, const LowRank<T>& tg, const LowRank<T>& tu,
                                                              float sg, float su, const float* cg, const float* cu, T* h, i64 rows,
                                                              i64 cols, int tiles) {
          LM_PLACE
          constexpr bool PA = KMAX <= 2;  // A fragments loaded before the wait
          const int nt = tiles_here(mb, rows, tiles);
          const W8* slot = lm_stages + warp * S * 2 * 64 + lane;
          const u32 slotAt = shared_address(slot);
          const T* const src[2] = {g, u};
        #pragma unroll
          for (int i = 0; i < S - 1; i++) issue_tile<T, 2, S>(slotAt, src, i, nt, mb, rows, cols, jc, colIn, gid);
          Frags<KMAX, false> bg, bu;
          load_b<T, KMAX>(bg, tg, c0, cols, gid, tig);
          load_b<T, KMAX>(bu, tu, c0, cols, gid, tig);
          for (int t = 0; t < nt; t++) {
            issue_tile<T, 2, S>(slotAt, src, t + S - 1, nt, mb, rows, cols, jc, colIn, gid);
            const i64 m0 = mb + 16 * t;
            AFrags<KMAX> ag, au;
            if constexpr (PA) {
              load_a<T, KMAX>(ag, tg, m0, rows, gid, tig);
              load_a<T, KMAX>(au, tu, m0, rows, gid, tig);
            }
            wait_async<S - 1>();
            const W8* st = slot + (t % S) * 2 * 64;
            float acc[4][4];
            if constexpr (!PA) load_a<T, KMAX>(ag, tg, m0, rows, gid, tig);
            mma_tile<T, KMAX>(acc, ag, bg, tg.ks);
            W8 gp[2] = {st[0], st[32]};
            add_update<T>(gp[0], acc, 0, sg, tg.ks);
            add_update<T>(gp[1], acc, 1, sg, tg.ks);
            if constexpr (RS) {
              if (cg != nullptr) {
                float c8[8];
                load_scales(c8, cg, jc, colIn);
                scale8<T>(gp[0], c8);
                scale8<T>(gp[1], c8);
              }
            }
            if constexpr (!PA) load_a<T, KMAX>(au, tu, m0, rows, gid, tig);
            mma_tile<T, KMAX>(acc, au, bu, tu.ks);
        #pragma unroll
            for (int hf = 0; hf < 2; hf++) {
              W8 up = st[(2 + hf) * 32];
              add_update<T>(up, acc, hf, su, tu.ks);
              if constexpr (RS) {
                if (cu != nullptr) {
                  float c8[8];
                  load_scales(c8, cu, jc, colIn);
                  scale8<T>(up, c8);
                }
              }
              const i64 row = m0 + 8 * hf + gid;
              // As lh_swiglu_fwd: act rounded to T, the product rounded once.
              float act[8];
        #pragma unroll
              for (int c = 0; c < 8; c++) {
                const float gv = Unpack<T>::at(gp[hf], c);
                act[c] = gv * sigmoid_of<FS>(gv);
              }
              if (colIn && row < rows) store8<T>(h, row * cols + jc, mul8<T>(pack8<T>(act), up));
            }
          }
          wait_async<0>();  // no copy outlives the block (the trailing groups are empty; kept for safety)
        }

        // Outputs alias inputs (dg = dh, du = u, h = g or null): each element is read (copied into the lane's own slot),
        // then written, by one thread; the copies ahead read later tokens only. RS: with DoRA's row scales (as
        // lh_lora_sswiglu_bwd: dG, dU rounded, then the gradients of the unscaled (updated) g, u are dG·c_g, dU·c_u) and
        // the scales' gradients Σ_tokens dG·g, dU·u per block into pg, pu (gridDim.y × cols, fp32; null: not wanted).
        template <typename T, int KMAX, int S, bool RS, bool FS = false>
        __device__ __forceinline__ void mlp_backward_pipelined(const T* dh, const LowRank<T>& td, const T* g, const T* u,
                                                               const LowRank<T>& tg, const LowRank<T>& tu, float sg, float su,
                                                               const float* cg, const float* cu, T* dg, T* du, T* h, float* pg,
                                                               float* pu, i64 rows, i64 cols, int tiles) {
          LM_PLACE
          constexpr bool PA = KMAX == 1;
          const int nt = tiles_here(mb, rows, tiles);
          W8* slot = lm_stages + warp * S * 3 * 64 + lane;
          const u32 slotAt = shared_address(slot);
          const T* const src[3] = {dh, g, u};
        #pragma unroll
          for (int i = 0; i < S - 1; i++) issue_tile<T, 3, S>(slotAt, src, i, nt, mb, rows, cols, jc, colIn, gid);
          Frags<KMAX, false> bd, bg, bu;
          load_b<T, KMAX>(bd, td, c0, cols, gid, tig);
          load_b<T, KMAX>(bg, tg, c0, cols, gid, tig);
          load_b<T, KMAX>(bu, tu, c0, cols, gid, tig);
          // RS: the lane's sums of dG·g (sums[0], sums[256]) and dU·u (sums[512], sums[768]) in shared slots of its own
          // after the stages (registers are the scarcer).
          F4* sums = reinterpret_cast<F4*>(lm_stages + 8 * S * 3 * 64) + threadIdx.x;
          if constexpr (RS) {
        #pragma unroll
            for (int i = 0; i < 4; i++) sums[256 * i] = F4{{0.f, 0.f, 0.f, 0.f}};
          }
          for (int t = 0; t < nt; t++) {
            issue_tile<T, 3, S>(slotAt, src, t + S - 1, nt, mb, rows, cols, jc, colIn, gid);
            const i64 m0 = mb + 16 * t;
            AFrags<KMAX> ad, ag, au;
            if constexpr (PA) {
              load_a<T, KMAX>(ad, td, m0, rows, gid, tig);
              load_a<T, KMAX>(ag, tg, m0, rows, gid, tig);
              load_a<T, KMAX>(au, tu, m0, rows, gid, tig);
            }
            wait_async<S - 1>();
            W8* st = slot + (t % S) * 3 * 64;
            float acc[4][4];
            // D = dh + dxa_d·A_d (the addmm's alpha and beta are 1).
            if constexpr (!PA) load_a<T, KMAX>(ad, td, m0, rows, gid, tig);
            mma_tile<T, KMAX>(acc, ad, bd, td.ks);
            // The updated D, G and U go back to the lane's own slots (fewer registers held across the next products).
            if (td.ks > 0) {
        #pragma unroll
              for (int hf = 0; hf < 2; hf++) {
                W8 v = st[hf * 32];
                add_update<T>(v, acc, hf, 1.f, td.ks);
                st[hf * 32] = v;
              }
            }
            if constexpr (!PA) load_a<T, KMAX>(ag, tg, m0, rows, gid, tig);
            mma_tile<T, KMAX>(acc, ag, bg, tg.ks);
            if (tg.ks > 0) {
        #pragma unroll
              for (int hf = 0; hf < 2; hf++) {
                W8 v = st[64 + hf * 32];
                add_update<T>(v, acc, hf, sg, tg.ks);
                st[64 + hf * 32] = v;
              }
            }
            if constexpr (!PA) load_a<T, KMAX>(au, tu, m0, rows, gid, tig);
            mma_tile<T, KMAX>(acc, au, bu, tu.ks);
            // U back to its slots too: the accumulators are free before the elementwise part.
            if (tu.ks > 0) {
        #pragma unroll
              for (int hf = 0; hf < 2; hf++) {
                W8 v = st[128 + hf * 32];
                add_update<T>(v, acc, hf, su, tu.ks);
                st[128 + hf * 32] = v;
              }
            }
        #pragma unroll
            for (int hf = 0; hf < 2; hf++) {
              const W8 dp = st[hf * 32];
              W8 gp = st[64 + hf * 32], up = st[128 + hf * 32];  // scaled below (RS); the unscaled stay in the slots
              if constexpr (RS) {
                float c8[8];
                if (cg != nullptr) {
                  load_scales(c8, cg, jc, colIn);
                  scale8<T>(gp, c8);
                }
                if (cu != nullptr) {
                  load_scales(c8, cu, jc, colIn);
                  scale8<T>(up, c8);
                }
              }
              const i64 row = m0 + 8 * hf + gid;
              // As lh_swiglu_bwd (and h as lh_swiglu_fwd): act rounded to T; dU = D·act and h = act·U rounded once.
              float sig[8], og[8];
              W8 ap;  // act, rounded
              {
                float act[8];
        #pragma unroll
                for (int c = 0; c < 8; c++) {
                  const float gv = Unpack<T>::at(gp, c);
                  sig[c] = sigmoid_of<FS>(gv);
                  act[c] = gv * sig[c];
                }
                ap = pack8<T>(act);
              }
        #pragma unroll
              for (int c = 0; c < 8; c++) {
                const float d = Unpack<T>::at(dp, c);
                const float gv = Unpack<T>::at(gp, c);
                const float uv = Unpack<T>::at(up, c);
                og[c] = d * uv * sig[c] * (1.f + gv * (1.f - sig[c]));
              }
              W8 dU = mul8<T>(dp, ap);
              if constexpr (RS) {
                float ou[8];
        #pragma unroll
                for (int c = 0; c < 8; c++) ou[c] = Unpack<T>::at(dU, c);
                round8<T>(og);
                const W8 gi = st[64 + hf * 32], ui = st[128 + hf * 32];
        #pragma unroll
                for (int half = 0; half < 2; half++) {
                  F4 a = sums[256 * half], b = sums[256 * (2 + half)];
        #pragma unroll
                  for (int c = 0; c < 4; c++) {
                    a.v[c] = fmaf(og[4 * half + c], Unpack<T>::at(gi, 4 * half + c), a.v[c]);
                    b.v[c] = fmaf(ou[4 * half + c], Unpack<T>::at(ui, 4 * half + c), b.v[c]);
                  }
                  sums[256 * half] = a;
                  sums[256 * (2 + half)] = b;
                }
                float c8[8];
                load_scales(c8, cg, jc, colIn);
        #pragma unroll
                for (int c = 0; c < 8; c++) og[c] *= c8[c];
                load_scales(c8, cu, jc, colIn);
        #pragma unroll
                for (int c = 0; c < 8; c++) ou[c] *= c8[c];
                dU = pack8<T>(ou);
              }
              if (colIn && row < rows) {
                const i64 at = row * cols + jc;
                store8<T>(dg, at, pack8<T>(og));
                store8<T>(du, at, dU);
                if (h != nullptr) store8<T>(h, at, mul8<T>(ap, up));
              }
            }
          }
          wait_async<0>();
          if constexpr (RS) {
            float sumg[8], sumu[8];
        #pragma unroll
            for (int c = 0; c < 8; c++) {
              sumg[c] = sums[256 * (c >> 2)].v[c & 3];
              sumu[c] = sums[256 * (2 + (c >> 2))].v[c & 3];
            }
            // The strip's columns belong to this warp alone: its sums over the 8 lanes of a column group are the block's.
        #pragma unroll
            for (int c = 0; c < 8; c++) {
        #pragma unroll
              for (int o = 4; o < 32; o <<= 1) {
                sumg[c] += __shfl_xor_sync(0xffffffffu, sumg[c], o);
                sumu[c] += __shfl_xor_sync(0xffffffffu, sumu[c], o);
              }
            }
            if (gid == 0 && colIn) {
              const i64 at = static_cast<i64>(blockIdx.y) * cols + jc;
        #pragma unroll
              for (int c = 0; c < 8; c++) {
                if (pg != nullptr) pg[at + c] = sumg[c];
                if (pu != nullptr) pu[at + c] = sumu[c];
              }
            }
          }
        }

        // ST: stages (tiles in flight + 1); dynamic shared memory ST·NT·8 KiB (NT = 2 forward, 3 backward). FB, BB as for
        // the register kernels (a register cap); RB, RBB the forward and backward with row scales (_rs_: DoRA; its backward
        // also takes 16 KiB more shared memory for its sums).
        #define LH_LORA_MLP_PIPE_ENTRIES(T, S, KMAX, ST, FB, BB, RB, RBB)                                                                 \
          extern "C" __global__ void __launch_bounds__(256, FB) lh_lora_mlp_mma_fwd_##S##_k##KMAX##_s##ST(                       \
              const T* g, const T* u, const T* xg, i64 ldg, int ksg, const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu,        \
              int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su, T* h, i64 rows, i64 cols, int tiles) {                 \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_forward_pipelined<T, KMAX, ST, false>(g, u, tg, tu, sg, su, nullptr, nullptr, h, rows, cols, tiles);             \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, BB) lh_lora_mlp_mma_bwd_##S##_k##KMAX##_s##ST(                       \
              T* dh, const T* xd, i64 ldd, int ksd, const T* wd, i64 wdj, i64 wdk, T* g, T* u, const T* xg, i64 ldg, int ksg,    \
              const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu, int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su,   \
              T* dg, T* du, T* h, i64 rows, i64 cols, int tiles) {                                                               \
            const LowRank<T> td = {xd, ldd, ksd, wd, wdj, wdk};                                                                  \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_backward_pipelined<T, KMAX, ST, false>(dh, td, g, u, tg, tu, sg, su, nullptr, nullptr, dg, du, h, nullptr,      \
                                                       nullptr, rows, cols, tiles);                                              \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, RB) lh_lora_mlp_mma_fwd_rs_##S##_k##KMAX##_s##ST(                    \
              const T* g, const T* u, const T* xg, i64 ldg, int ksg, const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu,        \
              int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su, const float* cg, const float* cu, T* h, i64 rows,      \
              i64 cols, int tiles) {                                                                                             \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_forward_pipelined<T, KMAX, ST, true>(g, u, tg, tu, sg, su, cg, cu, h, rows, cols, tiles);                        \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, RBB) lh_lora_mlp_mma_bwd_rs_##S##_k##KMAX##_s##ST(                     \
              T* dh, const T* xd, i64 ldd, int ksd, const T* wd, i64 wdj, i64 wdk, T* g, T* u, const T* xg, i64 ldg, int ksg,    \
              const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu, int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su,   \
              const float* cg, const float* cu, T* h, float* pg, float* pu, i64 rows, i64 cols, int tiles) {                     \
            const LowRank<T> td = {xd, ldd, ksd, wd, wdj, wdk};                                                                  \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            /* dG over dh, dU over u (the launch takes at most 32 arguments) */                                                  \
            mlp_backward_pipelined<T, KMAX, ST, true>(dh, td, g, u, tg, tu, sg, su, cg, cu, dh, u, h, pg, pu, rows, cols,        \
                                                      tiles);                                                                    \
          }

        // The rank-16 backward built for 4 blocks per multiprocessor (BackwardBlocksPerSm).
        #define LH_LORA_MLP_PIPE_B4(T, S, ST)                                                                                    \
          extern "C" __global__ void __launch_bounds__(256, 4) lh_lora_mlp_mma_bwd_##S##_k1_s##ST##_b4(                          \
              T* dh, const T* xd, i64 ldd, int ksd, const T* wd, i64 wdj, i64 wdk, T* g, T* u, const T* xg, i64 ldg, int ksg,    \
              const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu, int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su,   \
              T* dg, T* du, T* h, i64 rows, i64 cols, int tiles) {                                                               \
            const LowRank<T> td = {xd, ldd, ksd, wd, wdj, wdk};                                                                  \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_backward_pipelined<T, 1, ST, false>(dh, td, g, u, tg, tu, sg, su, nullptr, nullptr, dg, du, h, nullptr, nullptr, \
                                                    rows, cols, tiles);                                                          \
          }

        // FastSigmoid: rank 16, two stages, with and without row scales.
        #define LH_LORA_MLP_PIPE_FS(T, S)                                                                                        \
          extern "C" __global__ void __launch_bounds__(256, 4) lh_lora_mlp_mma_fwd_##S##_k1_s2_fs(                               \
              const T* g, const T* u, const T* xg, i64 ldg, int ksg, const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu,        \
              int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su, T* h, i64 rows, i64 cols, int tiles) {                 \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_forward_pipelined<T, 1, 2, false, true>(g, u, tg, tu, sg, su, nullptr, nullptr, h, rows, cols, tiles);           \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, 3) lh_lora_mlp_mma_bwd_##S##_k1_s2_fs(                               \
              T* dh, const T* xd, i64 ldd, int ksd, const T* wd, i64 wdj, i64 wdk, T* g, T* u, const T* xg, i64 ldg, int ksg,    \
              const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu, int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su,   \
              T* dg, T* du, T* h, i64 rows, i64 cols, int tiles) {                                                               \
            const LowRank<T> td = {xd, ldd, ksd, wd, wdj, wdk};                                                                  \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_backward_pipelined<T, 1, 2, false, true>(dh, td, g, u, tg, tu, sg, su, nullptr, nullptr, dg, du, h, nullptr,     \
                                                         nullptr, rows, cols, tiles);                                            \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, 4) lh_lora_mlp_mma_fwd_rs_##S##_k1_s2_fs(                            \
              const T* g, const T* u, const T* xg, i64 ldg, int ksg, const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu,        \
              int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su, const float* cg, const float* cu, T* h, i64 rows,      \
              i64 cols, int tiles) {                                                                                             \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_forward_pipelined<T, 1, 2, true, true>(g, u, tg, tu, sg, su, cg, cu, h, rows, cols, tiles);                      \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, 3) lh_lora_mlp_mma_bwd_rs_##S##_k1_s2_fs(                            \
              T* dh, const T* xd, i64 ldd, int ksd, const T* wd, i64 wdj, i64 wdk, T* g, T* u, const T* xg, i64 ldg, int ksg,    \
              const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu, int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su,   \
              const float* cg, const float* cu, T* h, float* pg, float* pu, i64 rows, i64 cols, int tiles) {                     \
            const LowRank<T> td = {xd, ldd, ksd, wd, wdj, wdk};                                                                  \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_backward_pipelined<T, 1, 2, true, true>(dh, td, g, u, tg, tu, sg, su, cg, cu, dh, u, h, pg, pu, rows, cols,      \
                                                        tiles);                                                                  \
          }

        LH_LORA_MLP_PIPE_FS(bf16, bf16)
        LH_LORA_MLP_PIPE_FS(f16, f16)
        LH_LORA_MLP_PIPE_B4(bf16, bf16, 2)
        LH_LORA_MLP_PIPE_B4(bf16, bf16, 3)
        LH_LORA_MLP_PIPE_B4(f16, f16, 2)
        LH_LORA_MLP_PIPE_B4(f16, f16, 3)
        LH_LORA_MLP_PIPE_ENTRIES(bf16, bf16, 1, 2, 4, 3, 4, 3)
        LH_LORA_MLP_PIPE_ENTRIES(bf16, bf16, 1, 3, 4, 3, 4, 3)
        LH_LORA_MLP_PIPE_ENTRIES(bf16, bf16, 2, 2, 2, 2, 2, 2)
        LH_LORA_MLP_PIPE_ENTRIES(bf16, bf16, 2, 3, 2, 2, 2, 2)
        LH_LORA_MLP_PIPE_ENTRIES(bf16, bf16, 4, 2, 2, 2, 2, 2)
        LH_LORA_MLP_PIPE_ENTRIES(bf16, bf16, 4, 3, 2, 2, 2, 2)
        LH_LORA_MLP_PIPE_ENTRIES(f16, f16, 1, 2, 4, 3, 4, 3)
        LH_LORA_MLP_PIPE_ENTRIES(f16, f16, 1, 3, 4, 3, 4, 3)
        LH_LORA_MLP_PIPE_ENTRIES(f16, f16, 2, 2, 2, 2, 2, 2)
        LH_LORA_MLP_PIPE_ENTRIES(f16, f16, 2, 3, 2, 2, 2, 2)
        LH_LORA_MLP_PIPE_ENTRIES(f16, f16, 4, 2, 2, 2, 2, 2)
        LH_LORA_MLP_PIPE_ENTRIES(f16, f16, 4, 3, 2, 2, 2, 2)
        """;
}
