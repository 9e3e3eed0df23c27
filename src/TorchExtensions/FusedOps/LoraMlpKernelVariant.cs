namespace LoRAHub.TorchExtensions;

/// <summary>
/// A variant of the pipelined LoRA MLP kernels (<see cref="LoraMlpKernels.Variants"/>), written "s{stages}v{flags}b{blocks}"
/// (optionally "@rows": its own tokens per block):
/// how their data moves, never what they compute (the same bits as today's kernels). Stages: 2..4 (tiles in flight + 1,
/// each warp's own cp.async ring in shared memory). Flags: 1 = the copies ask L2 for 256 bytes around each 16-byte piece (a
/// block's 8 warps read 512 contiguous bytes of each row at once), 2 = each tile's rows of the thin products x·Aᵀ are
/// copied with it and read by ldmatrix (no L2 round trip between a tile's wait and its products; half as much shared
/// memory again), 4 = (without 2) the A fragments of the next tile loaded into registers during this one. Blocks: blocks of 256 threads per multiprocessor the kernel is built for (its register cap: 4 → 64
/// registers a thread, 3 → 80, 2 → 128). Every variant walks per-lane addresses instead of index products and knows at
/// compile time that each term has rank 16 (it is taken only there).
/// </summary>
internal readonly record struct LoraMlpKernelVariant
{
    /// <summary>Flag: L2 fetches 256 bytes around each copied piece.</summary>
    public const int L2Prefetch = 1;

    /// <summary>Flag: the thin products' tile rows go through the stages too (A fragments by ldmatrix).</summary>
    public const int ThinRowsCopied = 2;

    /// <summary>Flag (without <see cref="ThinRowsCopied"/>): A fragments loaded a tile ahead into registers.</summary>
    public const int ThinAhead = 4;

    /// <summary>
    /// Flag (backward): A_down's gradient dxa_downᵀ·h is summed per block inside the kernel (an mma per tile of the thin rows
    /// and h, both transposed: by movmatrix in registers, or by ldmatrix with <see cref="ThinRowsCopied"/>; fp32) instead of h being written for a
    /// GEMM: 128 MiB less written and read at llama-1b. Taken where the caller asks for it
    /// (<see cref="LoraMlpKernels.Backward(Tensor, Tensor?, Tensor?, Tensor, Tensor, Tensor?, Tensor?, double, Tensor?, Tensor?, double, bool, Tensor?, Tensor?, bool, bool, Tensor?, Tensor?, System.Runtime.CompilerServices.StrongBox{Tensor?}?)"/>'s
    /// downAGrad); not the GEMM's bits (its sums in another order, kept in fp32).
    /// </summary>
    public const int DownAGradInKernel = 8;

    /// <summary>
    /// Flag (forward; F a multiple of 256): down's thin product h·A_downᵀ summed per 256-column block inside the kernel (an
    /// mma per tile of h, as the lanes hold it, with A_down's fragments; the block's 8 warps added in shared memory in a
    /// fixed order, one barrier a tile) instead of a GEMM reading h again: 128 MiB less read at llama-1b. Taken where the
    /// caller asks for it (<see cref="LoraMlpKernels.Forward"/>'s downXa); fp32 sums rounded once, not the GEMM's bits.
    /// </summary>
    public const int DownXaInKernel = 16;

    public LoraMlpKernelVariant(int stages, int flags, int blocks, int rows = 0)
    {
        if (stages is < 2 or > 4) throw new ArgumentOutOfRangeException(nameof(stages), stages, "2, 3 or 4");
        if (flags is < 0 or > 31) throw new ArgumentOutOfRangeException(nameof(flags), flags, "0..31");
        if (blocks is < 1 or > 4) throw new ArgumentOutOfRangeException(nameof(blocks), blocks, "1..4");
        if (rows != 0 && (rows < 16 || rows > 1024 || rows % 16 != 0))
            throw new ArgumentOutOfRangeException(nameof(rows), rows, "0 or 16..1024, multiples of 16");
        (Stages, Flags, Blocks, Rows) = (stages, flags, blocks, rows);
    }

    public int Stages { get; }
    public int Flags { get; }
    public int Blocks { get; }

    /// <summary>Tokens per block where this variant runs ("@rows" after the name; 0: <see cref="LoraMlpKernels.RowsPerBlock"/>).</summary>
    public int Rows { get; }

    /// <summary>Whether the thin products' rows are copied with each tile (<see cref="ThinRowsCopied"/>).</summary>
    public bool CopiesThinRows => (Flags & ThinRowsCopied) != 0;

    /// <summary>Whether the backward kernel forms A_down's gradient (<see cref="DownAGradInKernel"/>).</summary>
    public bool FormsDownAGrad => (Flags & DownAGradInKernel) != 0;

    /// <summary>This variant without <see cref="DownAGradInKernel"/> (the forward kernels, and callers that want h).</summary>
    public LoraMlpKernelVariant WithoutDownAGrad => new(Stages, Flags & ~DownAGradInKernel, Blocks, Rows);

    /// <summary>Whether the forward kernel forms down's thin product (<see cref="DownXaInKernel"/>).</summary>
    public bool FormsDownXa => (Flags & DownXaInKernel) != 0;

    /// <summary>This variant without <see cref="DownXaInKernel"/> (the backward kernels, and callers that do not take it).</summary>
    public LoraMlpKernelVariant WithoutDownXa => new(Stages, Flags & ~DownXaInKernel, Blocks, Rows);

    /// <summary>"s{stages}v{flags}b{blocks}" (in kernel and program names: the tokens per block are not part of a kernel).</summary>
    public string Name => $"s{Stages}v{Flags}b{Blocks}";

    /// <summary>The name, and "@rows" where the variant has its own tokens per block (as parsed).</summary>
    public override string ToString() => Rows == 0 ? Name : $"{Name}@{Rows}";

    /// <summary>"s3v2b4" or "s3v2b4@128" → the variant; "0", empty or anything else → null (today's kernels).</summary>
    public static LoraMlpKernelVariant? Parse(string? text)
    {
        var m = System.Text.RegularExpressions.Regex.Match(text?.Trim() ?? "", "^s([2-4])v([0-9]|[12][0-9]|3[01])b([1-4])(?:@([0-9]{2,4}))?$");
        if (!m.Success) return null;
        var rows = m.Groups[4].Success ? int.Parse(m.Groups[4].Value) : 0;
        if (rows != 0 && (rows < 16 || rows > 1024 || rows % 16 != 0)) return null;
        return new LoraMlpKernelVariant(int.Parse(m.Groups[1].Value), int.Parse(m.Groups[2].Value), int.Parse(m.Groups[3].Value), rows);
    }

    /// <summary>"fwd,bwd" or one value for both (LORAHUB_LORA_MLP_KERNEL_VARIANT).</summary>
    public static (LoraMlpKernelVariant? Forward, LoraMlpKernelVariant? Backward) ParsePair(string? text)
    {
        var parts = (text ?? "").Split(',');
        return parts.Length == 2 ? (Parse(parts[0]), Parse(parts[1])) : (Parse(parts[0]), Parse(parts[0]));
    }
}
