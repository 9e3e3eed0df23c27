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
/// (<see cref="RowScalesEnabled"/>). Results are rounded a pair at a time (lh_common's lh_round_pair, cvt.rn.bf16x2/f16x2:
/// the same bits as the SwiGLU kernels' conversions but for NaN payloads); a product of two rounded values (h = act·U, dU = D·act)
/// is one packed fma with −0 per pair in the pipelined kernels (exact products, one rounding: the same bits). sm_80+,
/// bf16 and fp16 only (fp32 takes the addmm path), ranks 0 (no update) or multiples of 16 up to 64, widths a multiple of
/// 8; LORAHUB_LORA_MLP_KERNEL=0 turns them off (the addmm path then). A compile failure turns only these off
/// (<see cref="CompileFailure"/>; one of the pipelined kernels only those, <see cref="PipelinedCompileFailure"/>).
/// Where every term has rank 16 the pipelined kernels come in variants (<see cref="Variants"/>, <see cref="LoraMlpKernelVariant"/>:
/// stages, L2 prefetch, thin rows through the stages, A fragments a tile ahead, register caps; the same bits), and the
/// backward one can form A_down's gradient itself instead of writing h.
/// </summary>
internal static class LoraMlpKernels
{
    /// <summary>Largest rank per projection taken (four k-steps of 16).</summary>
    public const long MaxRank = 64;

    private static readonly CudaProgram program = new("lora_mlp_mma.cu", Helpers + "\n" + RegisterKernels, dependentLaunch: true);

    // The pipelined kernels, a program of their own: a compile failure there leaves the register kernels on.
    private static readonly CudaProgram pipelinedProgram = new("lora_mlp_mma_pipe.cu", Helpers + "\n" + PipelinedKernels + "\n" + PipelinedEntries,
        dependentLaunch: true);

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

    /// <summary>
    /// The variant kernels of the forward and backward pass (null: today's pipelined kernels; LORAHUB_LORA_MLP_KERNEL_VARIANT
    /// ="fwd,bwd" or one value for both, each "s{stages}v{flags}b{blocks}[@rows]" (<see cref="LoraMlpKernelVariant"/>) or "0"; default
    /// s2v17b4@128,s2v9b2@256: L2 prefetch, down's thin product h·A_dᵀ in the forward kernel, A_down's gradient in the
    /// backward kernel at 256 tokens a block): the pipelined kernels with other stages, copy flags and register caps, taken
    /// where every term has rank 16 (LoRA and DoRA at r16). h, dg, du and DoRA's scale gradients: the same bits as today's
    /// kernels (tests; the scale gradients' per-block sums follow the tokens per block); a variant that does not compile
    /// turns only itself off (<see cref="VariantCompileFailure"/>).
    /// </summary>
    public static (LoraMlpKernelVariant? Forward, LoraMlpKernelVariant? Backward) Variants { get; set; } =
        LoraMlpKernelVariant.ParsePair(Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL_VARIANT") ?? DefaultVariants);

    // Measured on an H200 (call B, llama-1b r16 4×2048): LoRA 88,102 → 90,084 tok/s (+2.2%) with these, DoRA 81,984 → 84,254
    // (+2.8%) with its pair (microbench, µs a layer with down's thin products formed: forward 151.4 → 133.2, backward
    // 276.1 → 201.2; DoRA backward 354.9 → 244.6).
    private const string DefaultVariants = "s2v17b4@128,s2v9b2@256", DefaultRowScaleVariants = "s2v1b4@128,s2v9b2@256";

    /// <summary>The pairs taken without LORAHUB_LORA_MLP_KERNEL_VARIANT(_DORA) (tests check exactly these).</summary>
    internal static (LoraMlpKernelVariant? Forward, LoraMlpKernelVariant? Backward) DefaultVariantPair => LoraMlpKernelVariant.ParsePair(DefaultVariants);

    internal static (LoraMlpKernelVariant? Forward, LoraMlpKernelVariant? Backward) DefaultRowScaleVariantPair =>
        LoraMlpKernelVariant.ParsePair(DefaultRowScaleVariants);

    /// <summary>
    /// The variants where DoRA's gate/up row scales go into the kernels (null: <see cref="Variants"/> there too;
    /// LORAHUB_LORA_MLP_KERNEL_VARIANT_DORA="fwd,bwd" as for <see cref="Variants"/>, "0" for today's kernels; by default
    /// s2v1b4@128,s2v9b2@256, or <see cref="Variants"/> where only LORAHUB_LORA_MLP_KERNEL_VARIANT is set).
    /// </summary>
    public static (LoraMlpKernelVariant? Forward, LoraMlpKernelVariant? Backward)? RowScaleVariants { get; set; } =
        Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL_VARIANT_DORA") is { Length: > 0 } dora ? LoraMlpKernelVariant.ParsePair(dora)
        : Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL_VARIANT") is not null ? null
        : LoraMlpKernelVariant.ParsePair(DefaultRowScaleVariants);

    // The variants for kernels with or without row scales.
    private static (LoraMlpKernelVariant? Forward, LoraMlpKernelVariant? Backward) VariantsFor(bool rowScales) =>
        rowScales && RowScaleVariants is { } dora ? dora : Variants;

    private static long variantLaunches;

    /// <summary>Launches of the variant kernels (forward and backward) so far.</summary>
    public static long VariantLaunches => Interlocked.Read(ref variantLaunches);

    private static long downXaLaunches, downAGradLaunches;

    /// <summary>Forward launches that formed down's thin product h·A_dᵀ (<see cref="LoraMlpKernelVariant.DownXaInKernel"/>).</summary>
    public static long DownXaLaunches => Interlocked.Read(ref downXaLaunches);

    /// <summary>Backward launches that formed A_down's gradient (<see cref="LoraMlpKernelVariant.DownAGradInKernel"/>).</summary>
    public static long DownAGradLaunches => Interlocked.Read(ref downAGradLaunches);

    /// <summary>Why a variant kernel's program did not compile (the last such failure; null: none).</summary>
    public static string? VariantCompileFailure { get; private set; }

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
          + (Variants is (null, null) && RowScaleVariants is null ? ""
              : $", variants {Variants.Forward?.ToString() ?? "-"},{Variants.Backward?.ToString() ?? "-"}"
                + (RowScaleVariants is { } d ? $" (DoRA {d.Forward?.ToString() ?? "-"},{d.Backward?.ToString() ?? "-"})" : "")
                + $": {VariantLaunches} launches, h·A_dᵀ in {DownXaLaunches}, A_d's gradient in {DownAGradLaunches}")
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
    // A variant (<see cref="Variants"/>) is passed only where every term has rank 16 and its thin products fit it.
    private static (CudaFunction kernel, Dim3 grid, int tiles, int shared, bool variant) Launch(Tensor on, string op, long maxRank, int perStep,
        int stages, int blockRows, long rows, long cols, bool rowScales = false, LoraMlpKernelVariant? variant = null)
    {
        var k = maxRank <= 16 ? 1 : maxRank <= 32 ? 2 : 4;
        var device = DeviceIndex(on);
        // NVRTC loaded before any compile (Applies does it too; a caller that skipped it must not turn the programs off).
        if (!CudaKernels.Available) throw new InvalidOperationException($"LoRAHub's CUDA kernels are unavailable: {CudaKernels.UnavailableReason}");
        // Row scales only in the pipelined kernels (two stages where the register kernels are chosen).
        if (rowScales && stages == 0) stages = 2;
        var pipelined = stages > 0 && pipelinedProgram.Compiles(device, "the LoRA MLP takes its register kernels instead");
        if (rowScales && !pipelined) throw new InvalidOperationException("row scales need the pipelined kernels (see RowScalesApply)");
        var tensors = op == "fwd" ? 2 : 3;
        var chosen = pipelined && k == 1 && variant is { } v ? VariantKernel(device, op, v, on.dtype, rowScales) : null;
        if (chosen is not null) (stages, blockRows) = (variant!.Value.Stages, variant.Value.Rows > 0 ? variant.Value.Rows : blockRows);
        var mt = k == 1 && !pipelined ? perStep : 1;
        var rowTiles = (rows + 15) / 16;
        // The stages (tensors × 8 KiB each, half as much again for the thin products' rows with LM_XS) and, in the
        // backward with row scales, 16 KiB of per-thread sums.
        var stage = tensors * 8192 * (chosen is not null && variant!.Value.CopiesThinRows ? 3 : 2) / 2;
        var shared = pipelined ? stages * stage + (rowScales && op == "bwd" ? 16384 : 0) : 0;
        // LM_XA: the warps' sums of h·A_dᵀ, two buffers of 8 KiB.
        if (chosen is not null && variant!.Value.FormsDownXa) shared += 16384;
        var xBlocks = (cols + 255) / 256;
        if (blockRows == 0 && !pipelined) blockRows = op == "fwd" ? 128 : 64;
        var blocksPerSm = chosen is not null ? variant!.Value.Blocks : BlocksPerSm(op, k, rowScales);
        var tiles = Math.Max(blockRows == 0 ? OneWaveTiles(device, blocksPerSm, shared, rowTiles, xBlocks) : blockRows / 16,
            (int)((rowTiles + 65534) / 65535));
        tiles = (tiles + mt - 1) / mt * mt;
        var grid = new Dim3((uint)xBlocks, (uint)((rowTiles + tiles - 1) / tiles));
        if (!pipelined)
            return (program.Function(device, $"lh_lora_mlp_mma_{op}_{Suffix(on.dtype)}_k{k}_m{mt}"), grid, tiles, 0, false);
        var suffix = op == "bwd" && k == 1 && !rowScales && backwardBlocks == 4 ? "_b4"
            : FastSigmoid && k == 1 && stages == 2 ? "_fs" : "";
        var kernel = chosen ?? pipelinedProgram.Function(device, $"lh_lora_mlp_mma_{op}{(rowScales ? "_rs" : "")}_{Suffix(on.dtype)}_k{k}_s{stages}{suffix}");
        kernel.AllowDynamicSharedMemory(shared);
        Interlocked.Increment(ref pipelinedLaunches);
        if (chosen is not null) Interlocked.Increment(ref variantLaunches);
        return (kernel, grid, tiles, shared, chosen is not null);
    }

    // One program per variant, dtype and sigmoid (its kernels without and with row scales), compiled on first use.
    private static readonly Dictionary<string, CudaProgram> variantPrograms = new();

    // The variant's kernel for op ("fwd" or "bwd"), dtype, row scales and today's sigmoid setting, or null where its
    // program does not compile (today's kernels then). Tests read its registers.
    internal static CudaFunction? VariantKernel(int device, string op, LoraMlpKernelVariant v, ScalarType dtype, bool rowScales)
    {
        var (t, fs) = (Suffix(dtype), FastSigmoid);
        var key = $"{op}_{t}_r16_{v.Name}{(fs ? "_fs" : "")}";
        CudaProgram program;
        lock (variantPrograms)
        {
            if (!variantPrograms.TryGetValue(key, out program!))
                variantPrograms[key] = program = new CudaProgram($"lora_mlp_mma_{key}.cu", VariantSource(op, v, t, fs), dependentLaunch: true);
        }
        if (!program.Compiles(device, $"the LoRA MLP takes today's pipelined kernels instead of variant {v}"))
        {
            VariantCompileFailure = program.CompileFailure;
            return null;
        }
        return program.Function(device, $"lh_lora_mlp_mma_{op}{(rowScales ? "_rs" : "")}_{t}_r16_s{v.Stages}_v{v.Flags}_b{v.Blocks}{(fs ? "_fs" : "")}");
    }

    /// <summary>The source of one variant's program (tests and the local NVRTC check).</summary>
    internal static string VariantSource(string op, LoraMlpKernelVariant v, string dtype, bool fastSigmoid) =>
        Helpers + "\n" + PipelinedKernels + "\n" + VariantEntries + "\n"
        + $"LH_LORA_MLP_VARIANT_{op.ToUpperInvariant()}({dtype}, {dtype}, {v.Stages}, {v.Flags}, {v.Blocks}, {(fastSigmoid ? "true" : "false")}, {(fastSigmoid ? "_fs" : "")})\n";

    // Whether the variant kernels take these thin products (all of rank 16; with LM_XS their rows are 16-byte pieces).
    private static bool VariantFits(LoraMlpKernelVariant? v, params Tensor?[] xas) =>
        v is { } kv && xas.All(xa => xa is not null && xa.size(1) == 16
            && (!kv.CopiesThinRows || ((long)Ptr(xa) & 15) == 0 && xa.stride(0) * xa.element_size() % 16 == 0));

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
    /// With <paramref name="downXa"/> and <paramref name="downA"/> (A_down, r_d × F) and a forward variant that forms it
    /// (<see cref="LoraMlpKernelVariant.DownXaInKernel"/>; rank 16, F a multiple of 256), down's thin product h·A_downᵀ
    /// (tokens × r_d in the activations' dtype: fp32 sums rounded once) is put there too.
    /// </summary>
    public static Tensor Forward(Tensor g, Tensor u, Tensor? xaGate, Tensor? bGate, double scaleGate, Tensor? xaUp, Tensor? bUp, double scaleUp,
        Tensor? cGate = null, Tensor? cUp = null, Tensor? downA = null, System.Runtime.CompilerServices.StrongBox<Tensor?>? downXa = null)
    {
        using var scope = NewDisposeScope();
        long rows = g.size(0), cols = g.size(1);
        var h = empty_like(g);
        var scaled = cGate is not null || cUp is not null;
        var (cg, cu) = (F32(cGate), F32(cUp));
        var maxRank = Math.Max(bGate is null ? 0 : xaGate!.size(1), bUp is null ? 0 : xaUp!.size(1));
        var chosen = VariantsFor(scaled).Forward;
        var variant = VariantFits(chosen, bGate is null ? null : xaGate, bUp is null ? null : xaUp) ? chosen?.WithoutDownAGrad : null;
        // h·A_dᵀ in the kernel only where the caller takes it and A_d fits (16 rows of F, unit column stride, pairs aligned).
        var formsXa = variant is { FormsDownXa: true } && downXa is not null && cols % 256 == 0 && downA is { } a && a.dim() == 2
            && a.size(0) == 16 && a.size(1) == cols && a.stride(1) == 1 && a.stride(0) % 2 == 0 && ((long)Ptr(a) & 3) == 0 && a.dtype == g.dtype
            && SameDevice(a, g);
        if (variant is { FormsDownXa: true } v && !formsXa) variant = v.WithoutDownXa;
        var (kernel, grid, tiles, shared, variantTaken) = Launch(g, "fwd", maxRank, tilesInFlight.Forward, stages.Forward, rowsPerBlock.Forward,
            rows, cols, scaled, variant);
        // h·A_dᵀ per 256-column block (blocks × tokens × 16, fp32) where the kernel forms it.
        var px = formsXa && variantTaken ? empty([grid.X, rows, 16], ScalarType.Float32, g.device) : null;
        var args = new KernelArgs().Ptr(Ptr(g)).Ptr(Ptr(u));
        TermB(args, g.dtype, xaGate, bGate);
        TermB(args, g.dtype, xaUp, bUp);
        args.F32((float)scaleGate).F32((float)scaleUp);
        if (scaled) args.Ptr(cg is null ? IntPtr.Zero : Ptr(cg)).Ptr(cu is null ? IntPtr.Zero : Ptr(cu));
        args.Ptr(Ptr(h)).I64(rows).I64(cols).I32(tiles);
        // The variant kernels' last arguments: A_d, its row stride and the per-block sums (null, 0, null: not formed).
        if (variantTaken) args.Ptr(px is null ? IntPtr.Zero : Ptr(downA!)).I64(px is null ? 0 : downA!.stride(0)).Ptr(px is null ? IntPtr.Zero : Ptr(px));
        kernel.Launch(grid, 256, shared, args);
        Interlocked.Increment(ref forwardLaunches);
        // Σ over the column blocks (fixed order), rounded once to the activations' dtype. (The low-rank reduce kernel in one
        // launch instead of the sum and the cast measured no faster: 12.2-13.5 µs against 10 + 1.3 µs and a gap.)
        if (px is not null)
        {
            downXa!.Value = px.sum(dim: 0).to(g.dtype).MoveToOuterDisposeScope();
            Interlocked.Increment(ref downXaLaunches);
        }
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
    /// With <paramref name="downAGrad"/> and a backward variant that forms it (<see cref="LoraMlpKernelVariant.DownAGradInKernel"/>;
    /// h wanted, rank 16), A_down's gradient dxa_downᵀ·h (fp32, r_d × F) is put there and h is neither written nor returned.
    /// </summary>
    public static (Tensor dg, Tensor du, Tensor? h, Tensor? dcGate, Tensor? dcUp) Backward(Tensor dh, Tensor? dxaDown, Tensor? aDown,
        Tensor g, Tensor u, Tensor? xaGate, Tensor? bGate, double scaleGate, Tensor? xaUp, Tensor? bUp, double scaleUp, bool wantH,
        Tensor? cGate, Tensor? cUp, bool gateScaleGrad = false, bool upScaleGrad = false, Tensor? gateDivisor = null,
        Tensor? upDivisor = null, System.Runtime.CompilerServices.StrongBox<Tensor?>? downAGrad = null)
    {
        if (!BackwardApplies(dh, g)) throw new ArgumentException("dh must be contiguous, aligned, of g's dtype and shape");
        using var scope = NewDisposeScope();
        long rows = g.size(0), cols = g.size(1);
        var scaled = cGate is not null || cUp is not null;
        var (cg, cu) = (F32(cGate), F32(cUp));
        var maxRank = Math.Max(aDown is null ? 0 : dxaDown!.size(1), Math.Max(bGate is null ? 0 : xaGate!.size(1), bUp is null ? 0 : xaUp!.size(1)));
        var chosen = VariantsFor(scaled).Backward;
        var variant = VariantFits(chosen, aDown is null ? null : dxaDown, bGate is null ? null : xaGate, bUp is null ? null : xaUp)
            ? chosen?.WithoutDownXa : null;
        // A_d's gradient in the kernel only where the caller takes it instead of h.
        var formsDownAGrad = variant is { FormsDownAGrad: true } && wantH && aDown is not null && downAGrad is not null;
        if (variant is { FormsDownAGrad: true } v && !formsDownAGrad) variant = v.WithoutDownAGrad;

        var (kernel, grid, tiles, shared, variantTaken) = Launch(g, "bwd", maxRank, tilesInFlight.Backward, stages.Backward, rowsPerBlock.Backward,
            rows, cols, scaled, variant);
        // A_d's gradient per block (blocks × r_d × F, fp32) where the kernel forms it.
        var pa = formsDownAGrad && variantTaken ? empty([grid.Y, 16, cols], ScalarType.Float32, g.device) : null;
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
            args.Ptr(P(cg)).Ptr(P(cu)).Ptr(pa is not null ? Ptr(pa) : wantH ? Ptr(g) : IntPtr.Zero).Ptr(P(pg)).Ptr(P(pu));
        }
        // In place: dG over dh, dU over u, h over g (or A_d's per-block gradients into pa).
        else args.Ptr(Ptr(dh)).Ptr(Ptr(u)).Ptr(pa is not null ? Ptr(pa) : wantH ? Ptr(g) : IntPtr.Zero);
        args.I64(rows).I64(cols).I32(tiles);
        kernel.Launch(grid, 256, shared, args);
        Interlocked.Increment(ref backwardLaunches);
        if (pa is not null)
        {
            // Σ over the blocks (fixed order): dxa_dᵀ·h, r_d × F in fp32.
            downAGrad!.Value = pa.sum(dim: 0).MoveToOuterDisposeScope();
            Interlocked.Increment(ref downAGradLaunches);
            wantH = false;
        }
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
              int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su, T* h, i64 rows, i64 cols, int tiles) { lh_grid_dependency_sync();                 \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_forward<T, KMAX, MT>(g, u, tg, tu, sg, su, h, rows, cols, tiles);                                                \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, BB) lh_lora_mlp_mma_bwd_##S##_k##KMAX##_m##MT(                       \
              T* dh, const T* xd, i64 ldd, int ksd, const T* wd, i64 wdj, i64 wdk, T* g, T* u, const T* xg, i64 ldg, int ksg,    \
              const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu, int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su,   \
              T* dg, T* du, T* h, i64 rows, i64 cols, int tiles) { lh_grid_dependency_sync();                                                               \
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

        // An 8 × 8 matrix of 16-bit pairs held as mma fragments (lane l: row l / 4, columns 2·(l % 4), + 1), transposed in
        // the same layout (movmatrix, sm_75+). Warp-wide.
        __device__ __forceinline__ u32 transpose8x8(u32 v) {
          u32 r;
          asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(v));
          return r;
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

        // The variant kernels (LV >= 0: flags of how data moves, never of what is computed: the same bits; rank 16 in
        // every term, so no k-step is skipped at run time):
        #define LM_L2 1  // copies ask L2 for 256 bytes (a block's 8 warps read 512 contiguous bytes of each row at once)
        #define LM_XS 2  // each tile's rows of the thin products are copied with it; A fragments by ldmatrix from there
        #define LM_AR 4  // (without LM_XS) A fragments loaded a tile ahead into registers
        #define LM_DA 8  // (backward) A_d's gradient dxa_dᵀ·h summed per block in the kernel instead of writing h
        #define LM_XA 16  // (forward; all 8 warps live) the down update's thin product h·A_dᵀ summed per block in the kernel

        // A lane's walk over its block's tiles (variant kernels): the element offset of its first row at its column (row
        // stride ld: a kernel argument, not held per thread), 16 rows a tile, and the rows from its first one to the end
        // (0 where its columns do not exist): a half is in when more rows are left than lie before it, one compare
        // instead of index products per tile.
        struct Walk {
          i64 at0;
          int left;
          __device__ __forceinline__ i64 at(int t, i64 ld) const { return at0 + t * 16 * ld; }
          __device__ __forceinline__ bool in(int t, int hf) const { return left > 16 * t + 8 * hf; }
        };

        __device__ __forceinline__ Walk walk_of(i64 row0, i64 col, i64 ld, i64 rows, bool live) {
          const i64 left = rows - row0;
          return Walk{row0 * ld + col, !live ? 0 : left > (1 << 30) ? (1 << 30) : static_cast<int>(left)};
        }

        // copy16_async, with L2 fetching the 256 bytes around the piece (L2).
        template <bool L2>
        __device__ __forceinline__ void copy16_lm(u32 dst, const void* src, bool in) {
          if constexpr (L2) {
            asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(in ? 16 : 0) : "memory");
          } else {
            copy16_async(dst, src, in);
          }
        }

        // issue_tile for the variant kernels: a stage holds SW 16-byte slots a warp (NT tensors' two halves, then with XS
        // NX thin products' tile rows: 16 rows × 16 ranks, lane l the 8 ranks 8·(l / 16) .. of row l % 16, the order in
        // which ldmatrix takes them); the lane's addresses walked (w: the tensors', xw: the thin products').
        template <typename T, int NT, int NX, int S, bool L2, int NA>
        __device__ __forceinline__ void issue_walk(u32 slot, const T* const (&src)[NT], const Walk& w, i64 cols,
                                                   const u16* const (&xs)[NA], const Walk (&xw)[NA], const i64 (&ldx)[NA], int t,
                                                   int nt) {
          static_assert(NX <= NA, "a thin product without its walk");
          constexpr int SW = NT * 64 + NX * 32;
          if (t < nt) {
            const u32 st = slot + (t % S) * SW * 16;
            const i64 at = w.at(t, cols);
        #pragma unroll
            for (int hf = 0; hf < 2; hf++) {
              const bool in = w.in(t, hf);
              const i64 a = in ? at + hf * 8 * cols : 0;
        #pragma unroll
              for (int n = 0; n < NT; n++) copy16_lm<L2>(st + (2 * n + hf) * 32 * 16, src[n] + a, in);
            }
        #pragma unroll
            for (int j = 0; j < NX; j++) {
              const bool in = xw[j].in(t, 0);
              copy16_lm<L2>(st + (NT * 64 + j * 32) * 16, xs[j] + (in ? xw[j].at(t, ldx[j]) : 0), in);
            }
          }
          commit_async();
        }

        // load_a (one k-step) from a walked lane address (the pair at row gid, k 2·tig of the block's first tile).
        __device__ __forceinline__ void load_a_walk(u32 (&a)[4], const u16* x, const Walk& w, i64 ld, int t) {
          const i64 at = w.at(t, ld);
          const bool in0 = w.in(t, 0), in1 = w.in(t, 1);
          a[0] = load_pair(x, at, in0);
          a[1] = load_pair(x, at + 8 * ld, in1);
          a[2] = load_pair(x, at + 8, in0);
          a[3] = load_pair(x, at + 8 * ld + 8, in1);
        }

        // The walks of a term's thin product: for load_a_walk (row gid, k 2·tig) or, with XS, for its tile rows.
        template <typename T>
        __device__ __forceinline__ Walk walk_x(const LowRank<T>& t, i64 mb, i64 rows, int lane, bool xs) {
          return xs ? walk_of(mb + (lane & 15), 8 * (lane >> 4), t.ldx, rows, true) : walk_of(mb + (lane >> 2), 2 * (lane & 3), t.ldx, rows, true);
        }

        // RS: DoRA's row scales cg, cu (null: none) applied to the updated g and u on load (G = c_g ⊙ (g + s_g·xa_g·B_gᵀ),
        // each rounding as the scaled SwiGLU kernels do after the addmm path).
        // LV: -1 the kernels of today, else the variant kernels' flags (LM_L2, LM_XS, LM_AR; rank 16 in both terms).
        // XA (LM_XA): also h·A_dᵀ (ad: r_d = 16 rows of stride lda) of the block's 256 columns into px (gridDim.x × rows × 16,
        // fp32): per tile an mma of h (the lane's own registers: its pairs are the A fragments, columns taken in the order
        // the lanes hold them) with A_d's fragments (registers), the 8 warps' sums added in shared memory in a fixed order.
        template <typename T, int KMAX, int S, bool RS, bool FS = false, int LV = -1>
        __device__ __forceinline__ void mlp_forward_pipelined(const T* g, const T* u, const LowRank<T>& tg, const LowRank<T>& tu,
                                                              float sg, float su, const float* cg, const float* cu, T* h, i64 rows,
                                                              i64 cols, int tiles, const T* ad = nullptr, i64 lda = 0,
                                                              float* px = nullptr) {
          LM_PLACE
          constexpr bool PA = KMAX <= 2;  // A fragments loaded before the wait
          constexpr bool LEAN = LV >= 0, L2 = LEAN && (LV & LM_L2) != 0, XS = LEAN && (LV & LM_XS) != 0;
          constexpr bool AR = LEAN && !XS && (LV & LM_AR) != 0;
          constexpr bool XA = LEAN && (LV & LM_XA) != 0;
          constexpr int NX = XS ? 2 : 0, SW = 2 * 64 + NX * 32;  // 16-byte slots of a warp's stage
          const int nt = tiles_here(mb, rows, tiles);
          const W8* slot = lm_stages + warp * S * SW + lane;
          const u32 slotAt = shared_address(slot);
          const T* const src[2] = {g, u};
          // The variant kernels' walks: g, u, h at the lane's columns; the thin products' rows.
          const Walk w = walk_of(mb + gid, jc, cols, rows, colIn);
          const Walk xw[2] = {walk_x(tg, mb, rows, lane, XS), walk_x(tu, mb, rows, lane, XS)};
          const u16* const xs[2] = {reinterpret_cast<const u16*>(tg.x), reinterpret_cast<const u16*>(tu.x)};
          const i64 ldx[2] = {tg.ldx, tu.ldx};
          const int ksg = LEAN ? 1 : tg.ks, ksu = LEAN ? 1 : tu.ks;
        #pragma unroll
          for (int i = 0; i < S - 1; i++) {
            if constexpr (LEAN) issue_walk<T, 2, NX, S, L2>(slotAt, src, w, cols, xs, xw, ldx, i, nt);
            else issue_tile<T, 2, S>(slotAt, src, i, nt, mb, rows, cols, jc, colIn, gid);
          }
          AFrags<KMAX> an[2];  // AR: the next tile's A fragments
          if constexpr (AR) {
            load_a_walk(an[0].a[0], xs[0], xw[0], ldx[0], 0);
            load_a_walk(an[1].a[0], xs[1], xw[1], ldx[1], 0);
          }
          Frags<KMAX, false> bg, bu;
          load_b<T, KMAX>(bg, tg, c0, cols, gid, tig);
          load_b<T, KMAX>(bu, tu, c0, cols, gid, tig);
          // XA: A_d's fragments (k-step s: strip columns 8·tig + 4s .. + 3; n-tile nt: rank 8·nt + gid) and the warps' sums
          // (two buffers of 8 warps × 32 lanes × 8 floats after the stages).
          u32 bA[2][2][2];
          float* red = reinterpret_cast<float*>(lm_stages + 8 * S * SW);
          if constexpr (XA) {
            const u16* a16 = reinterpret_cast<const u16*>(ad);
        #pragma unroll
            for (int s = 0; s < 2; s++) {
        #pragma unroll
              for (int q = 0; q < 2; q++) {
                const i64 at = (8 * q + gid) * lda + jc + 4 * s;
                bA[s][q][0] = load_pair(a16, at, colIn);
                bA[s][q][1] = load_pair(a16, at + 2, colIn);
              }
            }
          }
          for (int t = 0; t < nt; t++) {
            if constexpr (XS) __syncwarp();  // every lane's ldmatrix of the stage refilled now is done
            if constexpr (LEAN) issue_walk<T, 2, NX, S, L2>(slotAt, src, w, cols, xs, xw, ldx, t + S - 1, nt);
            else issue_tile<T, 2, S>(slotAt, src, t + S - 1, nt, mb, rows, cols, jc, colIn, gid);
            const i64 m0 = mb + 16 * t;
            AFrags<KMAX> ag, au;
            if constexpr (AR) {
              ag = an[0];
              au = an[1];
              load_a_walk(an[0].a[0], xs[0], xw[0], ldx[0], t + 1);
              load_a_walk(an[1].a[0], xs[1], xw[1], ldx[1], t + 1);
            } else if constexpr (LEAN && !XS) {
              load_a_walk(ag.a[0], xs[0], xw[0], ldx[0], t);
              load_a_walk(au.a[0], xs[1], xw[1], ldx[1], t);
            } else if constexpr (!LEAN && PA) {
              load_a<T, KMAX>(ag, tg, m0, rows, gid, tig);
              load_a<T, KMAX>(au, tu, m0, rows, gid, tig);
            }
            wait_async<S - 1>();
            const W8* st = slot + (t % S) * SW;
            if constexpr (XS) {
              __syncwarp();  // the other lanes' copies of the thin rows are visible
              const u32 at = slotAt + (t % S) * SW * 16 + 2 * 64 * 16;
              ldsm_x4(ag.a[0], at);
              ldsm_x4(au.a[0], at + 32 * 16);
            }
            float acc[4][4];
            if constexpr (!LEAN && !PA) load_a<T, KMAX>(ag, tg, m0, rows, gid, tig);
            mma_tile<T, KMAX>(acc, ag, bg, ksg);
            W8 gp[2] = {st[0], st[32]};
            add_update<T>(gp[0], acc, 0, sg, ksg);
            add_update<T>(gp[1], acc, 1, sg, ksg);
            if constexpr (RS) {
              if (cg != nullptr) {
                float c8[8];
                load_scales(c8, cg, jc, colIn);
                scale8<T>(gp[0], c8);
                scale8<T>(gp[1], c8);
              }
            }
            if constexpr (!LEAN && !PA) load_a<T, KMAX>(au, tu, m0, rows, gid, tig);
            mma_tile<T, KMAX>(acc, au, bu, ksu);
            W8 hv[2];  // XA: h of both halves
        #pragma unroll
            for (int hf = 0; hf < 2; hf++) {
              W8 up = st[(2 + hf) * 32];
              add_update<T>(up, acc, hf, su, ksu);
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
              if constexpr (LEAN) {
                hv[hf] = mul8<T>(pack8<T>(act), up);
                if (w.in(t, hf)) store8<T>(h, w.at(t, cols) + hf * 8 * cols, hv[hf]);
              } else if (colIn && row < rows) {
                store8<T>(h, row * cols + jc, mul8<T>(pack8<T>(act), up));
              }
            }
            if constexpr (XA) {
              // The strip's h·A_dᵀ: tokens gid (0, 1), gid + 8 (2, 3) × ranks 8·nt + 2·tig, + 1.
              float cx[2][4];
        #pragma unroll
              for (int q = 0; q < 2; q++) {
        #pragma unroll
                for (int i = 0; i < 4; i++) cx[q][i] = 0.f;
              }
        #pragma unroll
              for (int s = 0; s < 2; s++) {
                const u32 a[4] = {hv[0].w[2 * s], hv[1].w[2 * s], hv[0].w[2 * s + 1], hv[1].w[2 * s + 1]};
        #pragma unroll
                for (int q = 0; q < 2; q++) Mma<T>::run(cx[q], a, bA[s][q][0], bA[s][q][1]);
              }
              // The 8 warps' sums (warp order) of value j of lane l, by thread 8·l + j; two buffers: one barrier a tile.
              F4* mine = reinterpret_cast<F4*>(red + (t & 1) * 2048 + (warp * 32 + lane) * 8);
        #pragma unroll
              for (int q = 0; q < 2; q++) mine[q] = F4{{cx[q][0], cx[q][1], cx[q][2], cx[q][3]}};
              __syncthreads();
              const int l = threadIdx.x >> 3, j = threadIdx.x & 7;  // value j of lane l
              const float* col = red + (t & 1) * 2048 + threadIdx.x;
              float sum = col[0];
        #pragma unroll
              for (int k = 1; k < 8; k++) sum += col[k * 256];
              const i64 token = m0 + (l >> 2) + 8 * ((j & 3) >> 1);
              if (token < rows) px[(static_cast<i64>(blockIdx.x) * rows + token) * 16 + 8 * (j >> 2) + 2 * (l & 3) + (j & 1)] = sum;
            }
          }
          wait_async<0>();  // no copy outlives the block (the trailing groups are empty; kept for safety)
        }

        // Outputs alias inputs (dg = dh, du = u, h = g or null): each element is read (copied into the lane's own slot),
        // then written, by one thread; the copies ahead read later tokens only. RS: with DoRA's row scales (as
        // lh_lora_sswiglu_bwd: dG, dU rounded, then the gradients of the unscaled (updated) g, u are dG·c_g, dU·c_u) and
        // the scales' gradients Σ_tokens dG·g, dU·u per block into pg, pu (gridDim.y × cols, fp32; null: not wanted).
        // LV as for mlp_forward_pipelined (rank 16 in all three terms).
        template <typename T, int KMAX, int S, bool RS, bool FS = false, int LV = -1>
        __device__ __forceinline__ void mlp_backward_pipelined(const T* dh, const LowRank<T>& td, const T* g, const T* u,
                                                               const LowRank<T>& tg, const LowRank<T>& tu, float sg, float su,
                                                               const float* cg, const float* cu, T* dg, T* du, T* h, float* pg,
                                                               float* pu, i64 rows, i64 cols, int tiles) {
          LM_PLACE
          constexpr bool PA = KMAX == 1;
          constexpr bool LEAN = LV >= 0, L2 = LEAN && (LV & LM_L2) != 0, XS = LEAN && (LV & LM_XS) != 0;
          constexpr bool AR = LEAN && !XS && (LV & LM_AR) != 0;
          // DA: h (A_d's gradient's other factor) is not written; dxa_dᵀ·h of the block's tokens goes to pa (the h argument:
          // gridDim.y × 16 × cols, fp32) instead: per tile an mma of the thin rows (16 tokens × 16 ranks) and h, both
          // transposed (XS: by ldmatrix from the stage, h written to the lane's D slots; else by movmatrix from the
          // registers: D's A fragments and h as the lane holds it), fp32 sums over the tiles.
          u32 bT[4][2];  // DA without XS: h's B fragments (n-tile i: columns 8·(n / 2) + 2i + n % 2; half: tokens 8·hf ..)
          constexpr bool DA = LEAN && (LV & LM_DA) != 0;
          constexpr int NX = XS ? 3 : 0, SW = 3 * 64 + NX * 32;  // 16-byte slots of a warp's stage
          const int nt = tiles_here(mb, rows, tiles);
          W8* slot = lm_stages + warp * S * SW + lane;
          const u32 slotAt = shared_address(slot);
          const T* const src[3] = {dh, g, u};
          // The variant kernels' walks: dh, g, u (and dg, du, h) at the lane's columns; the thin products' rows.
          const Walk w = walk_of(mb + gid, jc, cols, rows, colIn);
          const Walk xw[3] = {walk_x(td, mb, rows, lane, XS), walk_x(tg, mb, rows, lane, XS), walk_x(tu, mb, rows, lane, XS)};
          const u16* const xs[3] = {reinterpret_cast<const u16*>(td.x), reinterpret_cast<const u16*>(tg.x),
                                    reinterpret_cast<const u16*>(tu.x)};
          const i64 ldx[3] = {td.ldx, tg.ldx, tu.ldx};
          const int ksd = LEAN ? 1 : td.ks, ksg = LEAN ? 1 : tg.ks, ksu = LEAN ? 1 : tu.ks;
        #pragma unroll
          for (int i = 0; i < S - 1; i++) {
            if constexpr (LEAN) issue_walk<T, 3, NX, S, L2>(slotAt, src, w, cols, xs, xw, ldx, i, nt);
            else issue_tile<T, 3, S>(slotAt, src, i, nt, mb, rows, cols, jc, colIn, gid);
          }
          AFrags<KMAX> an[3];  // AR: the next tile's A fragments
          if constexpr (AR) {
        #pragma unroll
            for (int j = 0; j < 3; j++) load_a_walk(an[j].a[0], xs[j], xw[j], ldx[j], 0);
          }
          Frags<KMAX, false> bd, bg, bu;
          load_b<T, KMAX>(bd, td, c0, cols, gid, tig);
          load_b<T, KMAX>(bg, tg, c0, cols, gid, tig);
          load_b<T, KMAX>(bu, tu, c0, cols, gid, tig);
          // RS: the lane's sums of dG·g (sums[0], sums[256]) and dU·u (sums[512], sums[768]) in shared slots of its own
          // after the stages (registers are the scarcer).
          F4* sums = reinterpret_cast<F4*>(lm_stages + 8 * S * SW) + threadIdx.x;
          if constexpr (RS) {
        #pragma unroll
            for (int i = 0; i < 4; i++) sums[256 * i] = F4{{0.f, 0.f, 0.f, 0.f}};
          }
          float accA[4][4];  // DA: ranks gid (0, 1) and gid + 8 (2, 3) × strip columns 8q + 2·tig, + 1
        #pragma unroll
          for (int q = 0; q < 4; q++) {
        #pragma unroll
            for (int i = 0; i < 4; i++) accA[q][i] = 0.f;
          }
          for (int t = 0; t < nt; t++) {
            if constexpr (XS) __syncwarp();  // every lane's ldmatrix of the stage refilled now is done
            if constexpr (LEAN) issue_walk<T, 3, NX, S, L2>(slotAt, src, w, cols, xs, xw, ldx, t + S - 1, nt);
            else issue_tile<T, 3, S>(slotAt, src, t + S - 1, nt, mb, rows, cols, jc, colIn, gid);
            const i64 m0 = mb + 16 * t;
            AFrags<KMAX> ad, ag, au;
            if constexpr (AR) {
              ad = an[0];
              ag = an[1];
              au = an[2];
        #pragma unroll
              for (int j = 0; j < 3; j++) load_a_walk(an[j].a[0], xs[j], xw[j], ldx[j], t + 1);
            } else if constexpr (LEAN && !XS) {
              load_a_walk(ad.a[0], xs[0], xw[0], ldx[0], t);
              load_a_walk(ag.a[0], xs[1], xw[1], ldx[1], t);
              load_a_walk(au.a[0], xs[2], xw[2], ldx[2], t);
            } else if constexpr (!LEAN && PA) {
              load_a<T, KMAX>(ad, td, m0, rows, gid, tig);
              load_a<T, KMAX>(ag, tg, m0, rows, gid, tig);
              load_a<T, KMAX>(au, tu, m0, rows, gid, tig);
            }
            wait_async<S - 1>();
            W8* st = slot + (t % S) * SW;
            if constexpr (XS) {
              __syncwarp();  // the other lanes' copies of the thin rows are visible
              const u32 at = slotAt + (t % S) * SW * 16 + 3 * 64 * 16;
              ldsm_x4(ad.a[0], at);
              ldsm_x4(ag.a[0], at + 32 * 16);
              ldsm_x4(au.a[0], at + 64 * 16);
            }
            float acc[4][4];
            // D = dh + dxa_d·A_d (the addmm's alpha and beta are 1).
            if constexpr (!LEAN && !PA) load_a<T, KMAX>(ad, td, m0, rows, gid, tig);
            mma_tile<T, KMAX>(acc, ad, bd, ksd);
            // The updated D, G and U go back to the lane's own slots (fewer registers held across the next products).
            if (ksd > 0) {
        #pragma unroll
              for (int hf = 0; hf < 2; hf++) {
                W8 v = st[hf * 32];
                add_update<T>(v, acc, hf, 1.f, ksd);
                st[hf * 32] = v;
              }
            }
            if constexpr (!LEAN && !PA) load_a<T, KMAX>(ag, tg, m0, rows, gid, tig);
            mma_tile<T, KMAX>(acc, ag, bg, ksg);
            if (ksg > 0) {
        #pragma unroll
              for (int hf = 0; hf < 2; hf++) {
                W8 v = st[64 + hf * 32];
                add_update<T>(v, acc, hf, sg, ksg);
                st[64 + hf * 32] = v;
              }
            }
            if constexpr (!LEAN && !PA) load_a<T, KMAX>(au, tu, m0, rows, gid, tig);
            mma_tile<T, KMAX>(acc, au, bu, ksu);
            // U back to its slots too: the accumulators are free before the elementwise part.
            if (ksu > 0) {
        #pragma unroll
              for (int hf = 0; hf < 2; hf++) {
                W8 v = st[128 + hf * 32];
                add_update<T>(v, acc, hf, su, ksu);
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
              if constexpr (DA && XS) st[hf * 32] = mul8<T>(ap, up);  // h into the lane's D slot (read above) for the products below
              if constexpr (DA && !XS) {
                const W8 hw = mul8<T>(ap, up);
        #pragma unroll
                for (int i = 0; i < 4; i++) bT[i][hf] = transpose8x8(hw.w[i]);
              }
              if (LEAN ? w.in(t, hf) : colIn && row < rows) {
                const i64 at = LEAN ? w.at(t, cols) + hf * 8 * cols : row * cols + jc;
                store8<T>(dg, at, pack8<T>(og));
                store8<T>(du, at, dU);
                if (!DA && h != nullptr) store8<T>(h, at, mul8<T>(ap, up));
              }
            }
            if constexpr (DA && !XS) {
              // A = dxa_dᵀ: D's A fragments (tokens × ranks, 8 × 8 blocks) transposed, blocks 1 and 2 trading places.
              const u32 aT[4] = {transpose8x8(ad.a[0][0]), transpose8x8(ad.a[0][2]), transpose8x8(ad.a[0][1]), transpose8x8(ad.a[0][3])};
        #pragma unroll
              for (int i = 0; i < 4; i++) Mma<T>::run(accA[i], aT, bT[i][0], bT[i][1]);
            }
            if constexpr (DA && XS) {
              __syncwarp();  // every lane's h in its slots
              // The warp's stage: slot k at stage + 16·k. D slots: half hf, lane 4r + c: token r + 8·hf, strip columns 8c ...
              const u32 stage = slotAt - lane * 16 + (t % S) * SW * 16;
              // A = dxa_dᵀ (16 ranks × 16 tokens): the thin rows' 8 × 8 blocks transposed, lanes 8 .. 15 and 16 .. 23
              // trading places (matrix i: tokens 8·(i / 2) .., ranks 8·(i % 2) ..).
              u32 aT[4];
              ldsm_x4_t(aT, stage + (3 * 64 + ((lane & 7) | ((lane & 8) << 1) | ((lane & 16) >> 1))) * 16);
              // B = h (16 tokens × the 8 columns of group q): matrix i of a load: half i % 2, column group q0 + i / 2.
        #pragma unroll
              for (int q0 = 0; q0 < 4; q0 += 2) {
                u32 b[4];
                const int i = lane >> 3, r = lane & 7;
                ldsm_x4_t(b, stage + ((i & 1) * 32 + 4 * r + q0 + (i >> 1)) * 16);
                Mma<T>::run(accA[q0], aT, b[0], b[1]);
                Mma<T>::run(accA[q0 + 1], aT, b[2], b[3]);
              }
            }
          }
          wait_async<0>();
          if constexpr (DA) {
            // XS: n-tile q is strip columns 8q + 2·tig, + 1; else n-tile i is 8·tig + 2i, + 1 (the lane's own columns).
            float* pa = reinterpret_cast<float*>(h);
            const i64 at = static_cast<i64>(blockIdx.y) * 16 * cols + c0 + (XS ? 2 * tig : 8 * tig);
        #pragma unroll
            for (int q = 0; q < 4; q++) {
              if (XS ? c0 + 8 * q < cols : colIn) {
        #pragma unroll
                for (int r = 0; r < 2; r++) {
                  asm volatile("st.global.v2.f32 [%0], {%1, %2};" ::"l"(pa + at + (gid + 8 * r) * cols + (XS ? 8 * q : 2 * q)), "f"(accA[q][2 * r]),
                               "f"(accA[q][2 * r + 1])
                               : "memory");
                }
              }
            }
          }
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
        """;

    // The entry points of the pipelined program (today's kernels).
    private const string PipelinedEntries = """
        // ST: stages (tiles in flight + 1); dynamic shared memory ST·NT·8 KiB (NT = 2 forward, 3 backward). FB, BB as for
        // the register kernels (a register cap); RB, RBB the forward and backward with row scales (_rs_: DoRA; its backward
        // also takes 16 KiB more shared memory for its sums).
        #define LH_LORA_MLP_PIPE_ENTRIES(T, S, KMAX, ST, FB, BB, RB, RBB)                                                                 \
          extern "C" __global__ void __launch_bounds__(256, FB) lh_lora_mlp_mma_fwd_##S##_k##KMAX##_s##ST(                       \
              const T* g, const T* u, const T* xg, i64 ldg, int ksg, const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu,        \
              int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su, T* h, i64 rows, i64 cols, int tiles) { lh_grid_dependency_sync();                 \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_forward_pipelined<T, KMAX, ST, false>(g, u, tg, tu, sg, su, nullptr, nullptr, h, rows, cols, tiles);             \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, BB) lh_lora_mlp_mma_bwd_##S##_k##KMAX##_s##ST(                       \
              T* dh, const T* xd, i64 ldd, int ksd, const T* wd, i64 wdj, i64 wdk, T* g, T* u, const T* xg, i64 ldg, int ksg,    \
              const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu, int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su,   \
              T* dg, T* du, T* h, i64 rows, i64 cols, int tiles) { lh_grid_dependency_sync();                                                               \
            const LowRank<T> td = {xd, ldd, ksd, wd, wdj, wdk};                                                                  \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_backward_pipelined<T, KMAX, ST, false>(dh, td, g, u, tg, tu, sg, su, nullptr, nullptr, dg, du, h, nullptr,      \
                                                       nullptr, rows, cols, tiles);                                              \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, RB) lh_lora_mlp_mma_fwd_rs_##S##_k##KMAX##_s##ST(                    \
              const T* g, const T* u, const T* xg, i64 ldg, int ksg, const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu,        \
              int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su, const float* cg, const float* cu, T* h, i64 rows,      \
              i64 cols, int tiles) { lh_grid_dependency_sync();                                                                                             \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_forward_pipelined<T, KMAX, ST, true>(g, u, tg, tu, sg, su, cg, cu, h, rows, cols, tiles);                        \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, RBB) lh_lora_mlp_mma_bwd_rs_##S##_k##KMAX##_s##ST(                     \
              T* dh, const T* xd, i64 ldd, int ksd, const T* wd, i64 wdj, i64 wdk, T* g, T* u, const T* xg, i64 ldg, int ksg,    \
              const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu, int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su,   \
              const float* cg, const float* cu, T* h, float* pg, float* pu, i64 rows, i64 cols, int tiles) { lh_grid_dependency_sync();                     \
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
              T* dg, T* du, T* h, i64 rows, i64 cols, int tiles) { lh_grid_dependency_sync();                                                               \
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
              int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su, T* h, i64 rows, i64 cols, int tiles) { lh_grid_dependency_sync();                 \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_forward_pipelined<T, 1, 2, false, true>(g, u, tg, tu, sg, su, nullptr, nullptr, h, rows, cols, tiles);           \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, 3) lh_lora_mlp_mma_bwd_##S##_k1_s2_fs(                               \
              T* dh, const T* xd, i64 ldd, int ksd, const T* wd, i64 wdj, i64 wdk, T* g, T* u, const T* xg, i64 ldg, int ksg,    \
              const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu, int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su,   \
              T* dg, T* du, T* h, i64 rows, i64 cols, int tiles) { lh_grid_dependency_sync();                                                               \
            const LowRank<T> td = {xd, ldd, ksd, wd, wdj, wdk};                                                                  \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_backward_pipelined<T, 1, 2, false, true>(dh, td, g, u, tg, tu, sg, su, nullptr, nullptr, dg, du, h, nullptr,     \
                                                         nullptr, rows, cols, tiles);                                            \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, 4) lh_lora_mlp_mma_fwd_rs_##S##_k1_s2_fs(                            \
              const T* g, const T* u, const T* xg, i64 ldg, int ksg, const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu,        \
              int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su, const float* cg, const float* cu, T* h, i64 rows,      \
              i64 cols, int tiles) { lh_grid_dependency_sync();                                                                                             \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_forward_pipelined<T, 1, 2, true, true>(g, u, tg, tu, sg, su, cg, cu, h, rows, cols, tiles);                      \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, 3) lh_lora_mlp_mma_bwd_rs_##S##_k1_s2_fs(                            \
              T* dh, const T* xd, i64 ldd, int ksd, const T* wd, i64 wdj, i64 wdk, T* g, T* u, const T* xg, i64 ldg, int ksg,    \
              const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu, int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su,   \
              const float* cg, const float* cu, T* h, float* pg, float* pu, i64 rows, i64 cols, int tiles) { lh_grid_dependency_sync();                     \
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

    // The variant kernels' entry points (LORAHUB_LORA_MLP_KERNEL_VARIANT): rank 16 in every term, ST stages, LV flags (LM_L2,
    // LM_XS), built for B blocks of 256 threads per multiprocessor (a register cap), FS the approximate sigmoid (TAG _fs);
    // without and with DoRA's row scales. Each variant is a program of its own (VariantSource), compiled on first use.
    private const string VariantEntries = """
        #define LH_LORA_MLP_VARIANT_FWD(T, S, ST, LV, B, FS, TAG)                                                                \
          extern "C" __global__ void __launch_bounds__(256, B) lh_lora_mlp_mma_fwd_##S##_r16_s##ST##_v##LV##_b##B##TAG(          \
              const T* g, const T* u, const T* xg, i64 ldg, int ksg, const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu,        \
              int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su, T* h, i64 rows, i64 cols, int tiles, const T* ad,      \
              i64 lda, float* px) { lh_grid_dependency_sync();                                                                                              \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_forward_pipelined<T, 1, ST, false, FS, LV>(g, u, tg, tu, sg, su, nullptr, nullptr, h, rows, cols, tiles, ad, lda, \
                                                           px);                                                                  \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, B) lh_lora_mlp_mma_fwd_rs_##S##_r16_s##ST##_v##LV##_b##B##TAG(       \
              const T* g, const T* u, const T* xg, i64 ldg, int ksg, const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu,        \
              int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su, const float* cg, const float* cu, T* h, i64 rows,      \
              i64 cols, int tiles, const T* ad, i64 lda, float* px) { lh_grid_dependency_sync();                                                            \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_forward_pipelined<T, 1, ST, true, FS, LV>(g, u, tg, tu, sg, su, cg, cu, h, rows, cols, tiles, ad, lda, px);      \
          }

        #define LH_LORA_MLP_VARIANT_BWD(T, S, ST, LV, B, FS, TAG)                                                                \
          extern "C" __global__ void __launch_bounds__(256, B) lh_lora_mlp_mma_bwd_##S##_r16_s##ST##_v##LV##_b##B##TAG(          \
              T* dh, const T* xd, i64 ldd, int ksd, const T* wd, i64 wdj, i64 wdk, T* g, T* u, const T* xg, i64 ldg, int ksg,    \
              const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu, int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su,   \
              T* dg, T* du, T* h, i64 rows, i64 cols, int tiles) { lh_grid_dependency_sync();                                                               \
            const LowRank<T> td = {xd, ldd, ksd, wd, wdj, wdk};                                                                  \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_backward_pipelined<T, 1, ST, false, FS, LV>(dh, td, g, u, tg, tu, sg, su, nullptr, nullptr, dg, du, h, nullptr,  \
                                                            nullptr, rows, cols, tiles);                                         \
          }                                                                                                                      \
          extern "C" __global__ void __launch_bounds__(256, B) lh_lora_mlp_mma_bwd_rs_##S##_r16_s##ST##_v##LV##_b##B##TAG(       \
              T* dh, const T* xd, i64 ldd, int ksd, const T* wd, i64 wdj, i64 wdk, T* g, T* u, const T* xg, i64 ldg, int ksg,    \
              const T* wg, i64 wgj, i64 wgk, const T* xu, i64 ldu, int ksu, const T* wu, i64 wuj, i64 wuk, float sg, float su,   \
              const float* cg, const float* cu, T* h, float* pg, float* pu, i64 rows, i64 cols, int tiles) { lh_grid_dependency_sync();                     \
            const LowRank<T> td = {xd, ldd, ksd, wd, wdj, wdk};                                                                  \
            const LowRank<T> tg = {xg, ldg, ksg, wg, wgj, wgk};                                                                  \
            const LowRank<T> tu = {xu, ldu, ksu, wu, wuj, wuk};                                                                  \
            mlp_backward_pipelined<T, 1, ST, true, FS, LV>(dh, td, g, u, tg, tu, sg, su, cg, cu, dh, u, h, pg, pu, rows, cols,   \
                                                           tiles);                                                               \
          }
        """;
}
