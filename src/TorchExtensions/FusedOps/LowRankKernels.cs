using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// CUDA kernels for the thin products of a LoRA projection's backward, each reading its wide operand once:
/// <list type="bullet">
/// <item><see cref="Backward"/>: from the output gradient dy (tokens × n) both dxa = s·dy·B (tokens × r, the gradient of
/// the thin product xa = x·Aᵀ) and dB = s·dyᵀ·xa (n × r). cuBLAS runs them as two GEMMs that each read dy and reach a
/// quarter of the memory bandwidth at these shapes (llama-1b, 8192 tokens: ~30 µs each for dy of 8192 × 2048, whose
/// read takes ~8).</item>
/// <item><see cref="TransposedProduct"/>: s·yᵀ·t (n × r) or its transpose for a wide y (tokens × n) and a thin t
/// (tokens × r): dB alone, or the A gradient dA = dxaᵀ·x = (xᵀ·dxa)ᵀ. Not used by the LoRA blocks: measured slower than
/// cuBLAS for dA on an H200 (session 7: 28.5 against 17.2 µs at rank 48 for x of 8192 × 2048, 19.6 / 16.2 at rank 16).</item>
/// </list>
/// A block owns a strip of columns of the wide operand and a span of tokens, which it walks in tiles of 16 KB (64 tokens
/// × 128 columns or 32 × 256, <see cref="TileTokens"/>): each tile goes through shared memory once (cp.async, with
/// <see cref="Stages"/> − 1 tiles in flight while one is multiplied; one barrier per tile) and feeds both products on
/// tensor cores (mma.m16n8k16, fp32 accumulate; ldmatrix, transposed for dyᵀ and xa). dB's accumulators stay in registers
/// over the span; dxa is complete over the strip per tile (its column groups added through shared memory, written out
/// one tile later). Both go out as fp32 partial sums per block (dxa per strip, dB per span), which a second small kernel
/// adds in a fixed order, scales by s and rounds: no atomics, the same bits on every run with the same launch shape. dxa is rounded once to dy's dtype (as cuBLAS's epilogue rounds); dB goes out in fp32 or dy's dtype, as the
/// caller asks (fp32 masters take it without the bf16 rounding of the GEMM path). Two or three projections of one rank
/// (q, k, v; gate, up) share one launch of each kernel wherever their output gradients lie (<see cref="StackedBackward"/>,
/// <see cref="Grouped"/>): a block takes the output gradient, B and xa of the part its strip lies in.
/// <para>
/// sm_80+, bf16 and fp16, the wide operand with a width and row stride that are multiples of 8 (contiguous, or a column block of a wider buffer), ranks 16, 32, 48 and 64.
/// LORAHUB_LOWRANK_KERNEL=0 turns them off (the GEMMs then); a compile failure turns off only these
/// (<see cref="CompileFailure"/>).
/// </para>
/// </summary>
internal static class LowRankKernels
{
    /// <summary>Largest rank taken (multiples of 16).</summary>
    public const long MaxRank = 64;

    private const int Threads = 256;

    // One program per dtype: NVRTC compiles only the one in use (17 kernels, a few seconds).
    private static readonly CudaProgram bf16Program = new("lora_lowrank_bf16.cu", Source + "LH_LOWRANK_ALL(bf16, bf16)\n", dependentLaunch: true);
    private static readonly CudaProgram f16Program = new("lora_lowrank_f16.cu", Source + "LH_LOWRANK_ALL(f16, f16)\n", dependentLaunch: true);

    private static CudaProgram Program(ScalarType dtype) => dtype == ScalarType.BFloat16 ? bf16Program : f16Program;

    private static long launches;

    /// <summary>Calls that ran the kernels so far (tests: a silent fallback must not pass).</summary>
    public static long Launches => Interlocked.Read(ref launches);

    /// <summary>Whether the kernels may be used (default on; LORAHUB_LOWRANK_KERNEL=0: off).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LOWRANK_KERNEL")?.Trim() != "0";

    /// <summary>Why the kernels are off after a failed compile (null: they compiled, or were not tried).</summary>
    public static string? CompileFailure => bf16Program.CompileFailure ?? f16Program.CompileFailure;

    /// <summary>
    /// Blocks per multiprocessor the grid aims at (1..16, or null: as many as fit at once, <see cref="Resident"/>;
    /// LORAHUB_LOWRANK_KERNEL_BLOCKS sets it): more blocks put more bytes in flight but split the token spans finer, so
    /// dB's partial sums grow; more than fit at once leave a second wave. The bits of dB depend on it (the order of its
    /// fp32 additions), those of dxa do not.
    /// </summary>
    public static int? BlocksPerSm
    {
        get => blocksPerSm;
        set => blocksPerSm = value is null or (>= 1 and <= 16) ? value : throw new ArgumentOutOfRangeException(nameof(value), value, "1..16");
    }

    private static int? blocksPerSm =
        int.TryParse(Environment.GetEnvironmentVariable("LORAHUB_LOWRANK_KERNEL_BLOCKS"), out var b) && b is >= 1 and <= 16 ? b : null;

    /// <summary>
    /// Blocks of a product kernel that fit on a multiprocessor at once: the fewer of its register cap (__launch_bounds__
    /// below; 256 threads, 65,536 registers) and its shared memory (<see cref="SharedBytes"/>, 1 KB reserved per block,
    /// 227 KB per multiprocessor).
    /// </summary>
    public static int Resident(bool withDxa, long rank, int mt, int stages)
    {
        var byRegisters = (withDxa, rank, mt, stages) switch
        {
            (true, 16, 4, 4) => 2,
            (true, 16, 4, _) => 3,
            (true, 16, _, _) or (true, 32, _, _) => 2,
            (true, _, _, _) => 1,
            (false, 16, _, _) or (false, 32, 4, _) or (false, 48, 4, _) => 3,
            _ => 2,
        };
        return Math.Max(1, Math.Min(byRegisters, 232_448 / (SharedBytes(rank, mt, stages, withDxa) + 1024)));
    }

    /// <summary>
    /// Dynamic shared memory of a product kernel: per stage the dy tile and the xa tile (rows padded by 16 bytes), then
    /// with dxa the column groups' sums, double-buffered.
    /// </summary>
    public static int SharedBytes(long rank, int mt, int stages, bool withDxa) =>
        stages * (16 * mt * (512 / mt + 8) * 2 + 16 * mt * ((int)rank + 8) * 2) + (withDxa ? 2 * (8 / mt - 1) * mt * 16 * (int)rank * 4 : 0);

    /// <summary>
    /// Tiles in flight per block (cp.async stages, each ~20 KB: 2, 3 or 4; LORAHUB_LOWRANK_KERNEL_STAGES, default 3):
    /// the loads of stages − 1 tiles are in flight while one is multiplied. 2 and 4 exist for rank 16 only (the others
    /// take 3).
    /// </summary>
    public static int Stages
    {
        get => stages;
        set => stages = value is 2 or 3 or 4 ? value : throw new ArgumentOutOfRangeException(nameof(value), value, "2, 3 or 4");
    }

    private static int stages =
        int.TryParse(Environment.GetEnvironmentVariable("LORAHUB_LOWRANK_KERNEL_STAGES"), out var ns) && ns is 2 or 3 or 4 ? ns : 3;

    /// <summary>
    /// Tokens per tile: 64 (strips of 128 columns) or 32 (strips of 256); null (default; LORAHUB_LOWRANK_KERNEL_TILE
    /// sets it): per call, the one with the smaller fp32 partial sums (dxa's grow with the strips, dB's with the spans).
    /// The bits of dxa and dB depend on it.
    /// </summary>
    public static int? TileTokens
    {
        get => tileTokens;
        set => tileTokens = value is null or 32 or 64 ? value : throw new ArgumentOutOfRangeException(nameof(value), value, "32 or 64");
    }

    private static int? tileTokens =
        int.TryParse(Environment.GetEnvironmentVariable("LORAHUB_LOWRANK_KERNEL_TILE"), out var t) && t is 32 or 64 ? t : null;

    /// <summary>
    /// Largest rank per projection for which the LoRA blocks take <see cref="StackedBackward"/> (LORAHUB_LOWRANK_KERNEL_RANK;
    /// default 16): measured on an H200 (llama-1b, 8192 tokens, session 7 call A) the kernels beat the two GEMMs at rank
    /// 16 (n = 2048: 21.6 against 29.5 µs; 512: 15.3 / 16.8; 8192: 55.1 / 72.7) and lose at rank 48 (38.6 / 29.2).
    /// </summary>
    public static long FasterUpToRank { get; set; } =
        long.TryParse(Environment.GetEnvironmentVariable("LORAHUB_LOWRANK_KERNEL_RANK"), out var r) && r is >= 0 and <= MaxRank ? r : 16;

    /// <summary>One line for logs and benchmarks: launches so far, or why the kernels are off.</summary>
    public static string Report =>
        !Enabled ? "off (LORAHUB_LOWRANK_KERNEL=0)"
        : CompileFailure is { } why ? $"off (did not compile: {why})"
        : $"{Launches} launches";

    private static bool RankFits(long rank) => rank > 0 && rank <= MaxRank && rank % 16 == 0;

    // The wide operand: CUDA bf16/fp16, 2-D, 16-byte aligned, a width that is a multiple of 8, unit column stride and a
    // row stride that is a multiple of 8 (contiguous, or a column block of a wider buffer: q/k/v's gradients side by side).
    private static bool WideFits(Tensor y) =>
        Enabled && Usable(y) && y.dtype is ScalarType.BFloat16 or ScalarType.Float16 && y.dim() == 2 && y.numel() > 0
        && y.size(1) % 8 == 0 && y.stride(1) == 1 && y.stride(0) >= y.size(1) && y.stride(0) % 8 == 0 && Aligned16(Ptr(y));

    // A thin operand of y's tokens (rows), rank and dtype, on y's device (any layout: one that does not fit is copied).
    private static bool ThinFits(Tensor t, Tensor y, long rows, long rank) =>
        t.dim() == 2 && t.size(0) == rows && t.size(1) == rank && t.dtype == y.dtype && SameDevice(t, y);

    private static bool Compiles(Tensor y) =>
        CudaKernels.ComputeCapability(DeviceIndex(y)) >= 80 // bf16 mma
        && Program(y.dtype).Compiles(DeviceIndex(y), "the LoRA blocks take their thin products from GEMMs instead");

    /// <summary>
    /// True when <see cref="Backward"/> takes dy (tokens × n: CUDA bf16/fp16, 16-byte aligned, n a multiple of 8, unit
    /// column stride and a row stride that is a multiple of 8: contiguous, or a column block of a wider buffer), B (n × r, dy's dtype, any strides) and xa (tokens × r in dy's dtype, any layout; null: no dB wanted) with
    /// r a multiple of 16 up to 64.
    /// </summary>
    public static bool Applies(Tensor dy, Tensor b, Tensor? xa) =>
        WideFits(dy) && b.dim() == 2 && b.size(0) == dy.size(1) && RankFits(b.size(1)) && b.dtype == dy.dtype && SameDevice(b, dy)
        && (xa is null || ThinFits(xa, dy, dy.size(0), b.size(1))) && Compiles(dy);

    /// <summary>True when <see cref="TransposedProduct"/> takes y (as dy of <see cref="Applies"/>) and t (tokens × r, y's dtype).</summary>
    public static bool TransposedProductApplies(Tensor y, Tensor t) =>
        WideFits(y) && t.dim() == 2 && RankFits(t.size(1)) && ThinFits(t, y, y.size(0), t.size(1)) && Compiles(y);

    /// <summary>
    /// dxa = s·dy·B (tokens × r, dy's dtype) and, with <paramref name="xa"/>, dB = s·dyᵀ·xa (n × r, in
    /// <paramref name="dbType"/>: fp32, or dy's dtype when null), from one read of dy; fp32 accumulation throughout.
    /// With <paramref name="dxaOut"/> (tokens × r, dy's dtype, unit column stride: e.g. a column block of a stacked
    /// buffer) dxa is written there and that tensor returned. Call only where <see cref="Applies"/>.
    /// </summary>
    public static (Tensor dxa, Tensor? db) Backward(Tensor dy, Tensor b, Tensor? xa, double scale, Tensor? dxaOut = null,
        ScalarType? dbType = null)
    {
        long rows = dy.size(0), rank = b.size(1);
        if (dxaOut is not null && (dxaOut.dim() != 2 || dxaOut.size(0) != rows || dxaOut.size(1) != rank || dxaOut.dtype != dy.dtype
                || dxaOut.stride(1) != 1 || !SameDevice(dxaOut, dy)))
            throw new ArgumentException($"dxaOut must be {rows} × {rank} in {dy.dtype} with unit column stride on dy's device");
        using var scope = NewDisposeScope();
        var dxa = dxaOut ?? empty([rows, rank], dy.dtype, dy.device);
        var db = Run([new(dy, b, xa, scale, dbType)], rank, dxa, transposed: false, Shape(dy, [dy.size(1)], rank, true, StagesFor(true, rank))!.Value)[0];
        return (dxaOut is null ? dxa.MoveToOuterDisposeScope() : dxaOut, db?.MoveToOuterDisposeScope());
    }

    /// <summary>One projection's part of <see cref="StackedBackward"/>: its output gradient, B, xa (null: no dB) and scale.</summary>
    public readonly record struct Part(Tensor Dy, Tensor B, Tensor? Xa, double Scale, ScalarType? DbType = null);

    /// <summary>
    /// Whether <see cref="StackedBackward"/> takes two or three parts of one rank (q, k, v's; gate's and up's) in one launch
    /// of each kernel (LORAHUB_LOWRANK_KERNEL_GROUPED; default on, 0: a launch pair per part): the product kernel reads
    /// each part's output gradient where it lies (its own pointer and row stride) as if the parts stood side by side.
    /// The same bits either way where the launch shapes agree.
    /// </summary>
    public static bool Grouped { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LOWRANK_KERNEL_GROUPED")?.Trim() != "0";

    private static long groupedLaunches;

    /// <summary>Launches that took several parts at once so far.</summary>
    public static long GroupedLaunches => Interlocked.Read(ref groupedLaunches);

    /// <summary>
    /// <see cref="Backward"/> for projections that share one input (q/k/v; gate/up): their dxa's side by side in one
    /// tokens × Σr buffer in the order given (the layout of the stacked thin product x·[A₁; A₂; …]ᵀ, for dx += dxa·A and
    /// dA = dxaᵀ·x in one product each) and each B gradient (null where its xa is). Null, with nothing launched, unless
    /// the kernels apply to every part and every rank is at most <see cref="FasterUpToRank"/>: the caller then takes its
    /// GEMM path for all. Two or three parts of one rank go through one launch of each kernel (<see cref="Grouped"/>;
    /// every part's width but the last a multiple of the kernel's strip of 128 or 256 columns).
    /// </summary>
    public static (Tensor dxa, Tensor?[] db)? StackedBackward(IReadOnlyList<Part> parts)
    {
        if (parts.Count == 0) return null;
        var first = parts[0].Dy;
        if (!parts.All(p => p.Dy.dtype == first.dtype && p.Dy.size(0) == first.size(0) && p.B.size(1) <= FasterUpToRank
                && Applies(p.Dy, p.B, p.Xa))) return null;
        var dxa = empty([first.size(0), parts.Sum(p => p.B.size(1))], first.dtype, first.device);
        var rank = parts[0].B.size(1);
        if (Grouped && parts.Count is 2 or 3 && parts.All(p => p.B.size(1) == rank)
            && Shape(first, parts.Select(p => p.Dy.size(1)).ToArray(), rank, true, StagesFor(true, rank)) is { } shape)
        {
            using var scope = NewDisposeScope();
            var dbs = Run(parts.Select(p => new Operand(p.Dy, p.B, p.Xa, p.Scale, p.DbType)).ToList(), rank, dxa, transposed: false, shape);
            Interlocked.Increment(ref groupedLaunches);
            return (dxa, dbs.Select(d => d?.MoveToOuterDisposeScope()).ToArray());
        }
        var db = new Tensor?[parts.Count];
        long offset = 0;
        for (var i = 0; i < parts.Count; i++)
        {
            var (dy, b, xa, scale, dbType) = parts[i];
            using var block = dxa.narrow(1, offset, b.size(1));
            (_, db[i]) = Backward(dy, b, xa, scale, block, dbType);
            offset += b.size(1);
        }
        return (dxa, db);
    }

    /// <summary>
    /// s·yᵀ·t (n × r) for y (tokens × n) and t (tokens × r), or with <paramref name="transposed"/> its transpose (r × n,
    /// e.g. the A gradient dxaᵀ·x), in <paramref name="dtype"/> (fp32, or y's dtype when null); fp32 accumulation. Call
    /// only where <see cref="TransposedProductApplies"/>.
    /// </summary>
    public static Tensor TransposedProduct(Tensor y, Tensor t, double scale = 1, bool transposed = false, ScalarType? dtype = null)
    {
        using var scope = NewDisposeScope();
        var rank = t.size(1);
        var shape = Shape(y, [y.size(1)], rank, false, StagesFor(false, rank))!.Value;
        return Run([new(y, null, t, scale, dtype)], rank, null, transposed, shape)[0]!.MoveToOuterDisposeScope();
    }

    // The kernels built with 2 and 4 stages are dxa-and-dB ones at rank 16 only.
    private static int StagesFor(bool withDxa, long rank) => withDxa && rank == 16 ? stages : 3;

    // A part of one launch: a Part, or (B null) the dB product alone.
    private readonly record struct Operand(Tensor Dy, Tensor? B, Tensor? Xa, double Scale, ScalarType? DbType);

    // One launch of the product kernel over parts side by side in the launch's columns (each part's dy where it lies),
    // then one of the reduce: part p's dxa into dxa's columns p·r.. (the parts' B null: the dB product alone), each
    // part's B gradient (null where its xa is).
    private static Tensor?[] Run(IReadOnlyList<Operand> parts, long rank, Tensor? dxa, bool transposed, (int mt, long strips, long spans, long span) shape)
    {
        var dy = parts[0].Dy;
        long rows = dy.size(0), cols = parts.Sum(p => p.Dy.size(1));
        var dt = dy.dtype;
        foreach (var p in parts)
            if (p.DbType is { } want && want != ScalarType.Float32 && want != dt) throw new ArgumentException($"products come in float32 or {dt}, not {want}");
        var withDxa = parts[0].B is not null;
        var device = DeviceIndex(dy);
        var ns = StagesFor(withDxa, rank);
        var (mt, strips, spans, span) = shape;
        long tc = 512 / mt;

        // LrParts: b[3], bj[3], bk[3], xa[3], ldx[3], start[3] (an absent part starts at cols), dy[3], ldy[3];
        // LrReduce: strip[4], start[3], s[3], db[3].
        var words = new ulong[24];
        var starts = new long[] { cols, cols, cols };
        var dbs = new Tensor?[parts.Count];
        var dbF32 = 0;
        long start = 0;
        for (var p = 0; p < parts.Count; p++)
        {
            var (pdy, b, xa, _, dbType) = parts[p];
            // xa's tile rows are read as 16-byte chunks: unit column stride, row stride and address multiples of 16 bytes.
            var x = xa is null || (xa.stride(1) == 1 && xa.stride(0) % 8 == 0 && Aligned16(Ptr(xa))) ? xa : xa.contiguous();
            (words[p], words[3 + p], words[6 + p]) = b is null ? (0UL, 0UL, 0UL) : ((ulong)(long)Ptr(b), (ulong)b.stride(0), (ulong)b.stride(1));
            (words[9 + p], words[12 + p]) = x is null ? (0UL, 0UL) : ((ulong)(long)Ptr(x), (ulong)x.stride(0));
            (words[18 + p], words[21 + p]) = ((ulong)(long)Ptr(pdy), (ulong)pdy.stride(0));
            starts[p] = start;
            var f32 = (dbType ?? dt) == ScalarType.Float32;
            if (f32) dbF32 |= 1 << p;
            var n = pdy.size(1);
            if (x is not null) dbs[p] = empty(transposed ? [rank, n] : [n, rank], f32 ? ScalarType.Float32 : dt, dy.device);
            start += n;
        }
        for (var p = 0; p < 3; p++) words[15 + p] = (ulong)starts[p];

        var pxa = withDxa ? empty([strips, rows, rank], ScalarType.Float32, dy.device) : null;
        var pdb = dbs.Any(d => d is not null) ? empty([spans, cols, rank], ScalarType.Float32, dy.device) : null;
        var args = new KernelArgs().I64(rows).I64(cols).Struct(words);
        if (pxa is not null) args.Ptr(Ptr(pxa));
        args.Ptr(pdb is null ? IntPtr.Zero : Ptr(pdb)).I64(span);
        var kernel = Program(dt).Function(device, $"lh_lowrank_{(withDxa ? "bwd" : "tprod")}_{Suffix(dt)}_r{rank}_m{mt}_s{ns}");
        var shared = SharedBytes(rank, mt, ns, withDxa);
        kernel.AllowDynamicSharedMemory(shared);
        kernel.Launch(new Dim3((uint)strips, (uint)spans), Threads, shared, args);

        int Strip(int p) => (int)(p < parts.Count ? starts[p] / tc : strips);
        float Scale(int p) => p < parts.Count ? (float)parts[p].Scale : 0f;
        ulong Db(int p) => p < parts.Count && dbs[p] is { } d ? (ulong)(long)Ptr(d) : 0UL;
        var reduce = new[]
        {
            KernelArgs.Pair(Strip(0), Strip(1)), KernelArgs.Pair(Strip(2), (int)strips),
            (ulong)starts[0], (ulong)starts[1], (ulong)starts[2],
            KernelArgs.Pair(Scale(0), Scale(1)), KernelArgs.Pair(Scale(2), 0f),
            Db(0), Db(1), Db(2),
        };
        // A thread per 4 outputs (rank a multiple of 16).
        var outputs = (pxa is null ? 0 : rows * rank * parts.Count) + (pdb is null ? 0 : cols * rank);
        Program(dt).Function(device, $"lh_lowrank_reduce_{Suffix(dt)}")
            .Launch((outputs / 4 + Threads - 1) / Threads, Threads, 0,
                new KernelArgs().Ptr(pxa is null ? IntPtr.Zero : Ptr(pxa)).Ptr(pdb is null ? IntPtr.Zero : Ptr(pdb)).I32((int)spans)
                    .I64(rows).I64(cols).I32((int)rank).I32(parts.Count).Struct(reduce)
                    .Ptr(dxa is null ? IntPtr.Zero : Ptr(dxa)).I64(dxa?.stride(0) ?? 0).I32(dbF32).I32(transposed ? 1 : 0));
        Interlocked.Increment(ref launches);
        return dbs;
    }

    // The launch: m-tiles per tile (4: 64 tokens × 128 columns; 2: 32 × 256), column strips, token spans and tokens per
    // span (a multiple of the tile; no span without tokens). Up to BlocksPerSm (or Resident) blocks per multiprocessor;
    // the tile with the fewer partial-sum bytes (strips × tokens × r for dxa, spans × n × r for dB) unless TileTokens says.
    // Several parts (widths side by side): only a tile whose strip divides every part's first column, or null.
    private static (int mt, long strips, long spans, long span)? Shape(Tensor dy, long[] widths, long rank, bool withDxa, int ns)
    {
        var rows = dy.size(0);
        var sms = CudaKernels.MultiprocessorCount(DeviceIndex(dy));
        var cols = widths.Sum();
        (int, long, long, long, long)? For(int mt)
        {
            long tt = 16 * mt, tc = 512 / mt;
            long start = 0;
            for (var p = 0; p < widths.Length - 1; p++)
                if ((start += widths[p]) % tc != 0) return null;
            var strips = (cols + tc - 1) / tc;
            var tiles = (rows + tt - 1) / tt;
            // At most one wave: a few blocks of a second one would take as long as the first.
            var spans = Math.Clamp((blocksPerSm ?? Resident(withDxa, rank, mt, ns)) * sms / strips, 1, tiles);
            var span = (tiles + spans - 1) / spans * tt;
            spans = (rows + span - 1) / span;
            return (mt, strips, spans, span, (withDxa ? strips * rows : 0) + spans * cols);
        }
        var (m4, m2) = (For(4), For(2));
        var chosen = tileTokens switch
        {
            64 => m4,
            32 => m2,
            _ => m2 is null ? m4 : m4 is null ? m2 : m2.Value.Item5 < m4.Value.Item5 ? m2 : m4,
        };
        if (chosen is not var (mt, strips, spans, span, _)) return null;
        if (spans > 65535) throw new ArgumentException($"{rows} tokens are too many for one launch");
        return (mt, strips, spans, span);
    }

    // Block: 8 warps over tiles of TT = 16·MT tokens × TC = 512 / MT columns (16 KB; MT = 4: 64 × 128, MT = 2: 32 × 256),
    // TC being the block's strip. Lane l: gid = l / 4, tig = l % 4.
    // dB: warp w owns strip columns 16·DM·w .. (DM = 4 / MT m-tiles of 16; M), ranks (N), the tile's tokens as MT k-steps:
    // A = dyᵀ by ldmatrix.trans of the dy tile, B = xa by ldmatrix.trans of the xa tile (rows: tokens).
    // dxa: warp w owns the tile's tokens 16·(w % MT) .. (M), ranks (N), strip columns 64·(w / MT) .. as 4 k-steps (one of
    // G = 8 / MT column groups): A = dy by ldmatrix, B = B's fragments held in registers for the whole block; groups 1 ..
    // leave their sums in shared memory (double-buffered by tile parity), group 0 adds them in group order after the next
    // tile's barrier and writes the strip's partial: one __syncthreads per tile.
    // Shared rows are padded by 16 bytes so that the 8 row addresses of each ldmatrix fall in distinct banks.
    private const string Source = """
        #include "lh_common.cuh"
        #include "lh_mma.cuh"

        // B(k, n) as 16 bits, 0 past the last column.
        __device__ __forceinline__ u32 b_elem(const u16* b, i64 k, int n, i64 bj, i64 bk, i64 cols) {
          return k < cols ? static_cast<u32>(b[k * bj + n * bk]) : 0u;
        }

        // R8: ranks / 8 (n-tiles of 8); MT: token m-tiles per tile (4 or 2); DX: dxa wanted (false: dB only, b and pxa
        // unused). span: tokens per block (a multiple of the tile). xa null: dxa only.
        // The stages of the tile pipeline (dynamic shared memory): per stage the dy tile, then the xa tile.
        extern __shared__ W8 lr_stages[];

        // Up to three parts side by side in the launch's columns (q, k, v's gradients; gate's and up's): part p has its own
        // dy (row stride ldy[p], anywhere: adjacent column blocks of one buffer or apart), B and xa, and starts at column
        // start[p] (start[0] = 0; a part absent: its start is cols). Every part's width but the last is a multiple of the
        // strip's, so a block's strip lies in one part.
        template <typename T>
        struct LrParts {
          const T* b[3];
          i64 bj[3], bk[3];
          const T* xa[3];
          i64 ldx[3];
          i64 start[3];
          const T* dy[3];
          i64 ldy[3];
        };

        // Element p (0..2) of a kernel argument's array by constant indices: indexing the argument with a variable makes
        // every thread copy the whole struct to local memory (measured: the reduce 3 to 5 times slower).
        template <typename V>
        __device__ __forceinline__ V lh_pick(int p, const V (&a)[3]) {
          return p == 0 ? a[0] : p == 1 ? a[1] : a[2];
        }

        // The part column c lies in, and a part's width, from the parts' first columns (cols: all parts' width).
        __device__ __forceinline__ int lr_part(const i64 (&start)[3], i64 c) { return c >= start[2] ? 2 : c >= start[1] ? 1 : 0; }
        __device__ __forceinline__ i64 lr_part_cols(const i64 (&start)[3], int p, i64 cols) {
          return (p == 2 ? cols : p == 1 ? start[2] : start[1]) - lh_pick(p, start);
        }

        template <typename T, int R8, int MT, bool DX, int NS>
        __device__ __forceinline__ void lowrank_backward(i64 rows, i64 cols, const LrParts<T>& parts,
                                                         float* __restrict__ pxa, float* __restrict__ pdb, i64 span) {
          constexpr int R = 8 * R8;
          constexpr int TT = 16 * MT, TC = 512 / MT;         // tile tokens, strip columns
          constexpr int G = 8 / MT, DM = 4 / MT;             // dxa column groups, dB m-tiles per warp
          constexpr int CH = TC / 8;                         // 16-byte chunks per tile row
          constexpr int DYS = TC + 8;                        // shared row stride of the dy tile (elements)
          constexpr int XS = R + 8;                          // shared row stride of the xa tile (elements)
          constexpr int XCH = TT * R8;                       // 16-byte chunks of an xa tile
          constexpr int XC = (XCH + 255) / 256;              // of them per thread
          constexpr int STAGE_DY = TT * DYS * 2, STAGE = STAGE_DY + TT * XS * 2;  // bytes
          // After the stages: dxa of column groups 1 .. per token m-tile, double-buffered (tile parity): red(b, g, m, row, n).
          float* const red = reinterpret_cast<float*>(lr_stages + NS * STAGE / 16);
          auto at = [](int b, int g, int m, int row, int n) { return (((b * (G - 1) + g) * MT + m) * 16 + row) * R + n; };
          const u32 stages_a = shared_address(lr_stages);

          const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
          const int quad = lane >> 3, r8 = lane & 7;         // ldmatrix: the matrix this lane addresses, and its row
          const i64 c0 = static_cast<i64>(blockIdx.x) * TC;
          const int part = lr_part(parts.start, c0);
          const i64 pc0 = lh_pick(part, parts.start), pcols = lr_part_cols(parts.start, part, cols);
          const T* __restrict__ dy = lh_pick(part, parts.dy);  // the part's column 0
          const i64 ldy = lh_pick(part, parts.ldy);
          const T* __restrict__ b = lh_pick(part, parts.b);
          const T* __restrict__ xa = lh_pick(part, parts.xa);
          const i64 bj = lh_pick(part, parts.bj), bk = lh_pick(part, parts.bk), ldx = lh_pick(part, parts.ldx);
          const i64 tBegin = static_cast<i64>(blockIdx.y) * span;
          const i64 tEnd = rows < tBegin + span ? rows : tBegin + span;
          const bool withDb = xa != nullptr;
          const int mt = warp % MT, grp = warp / MT;         // dxa: token m-tile, column group

          // B's fragments for the warp's dxa columns c0 + 64·grp + 16·ks ..: register 0 holds k = 2·tig, +1 and register 1
          // k + 8, k + 9, at rank n = 8·nt + gid.
          u32 bf[DX ? 4 : 1][R8][2];
          if constexpr (DX) {
            const u16* bw = reinterpret_cast<const u16*>(b);
        #pragma unroll
            for (int ks = 0; ks < 4; ks++) {
        #pragma unroll
              for (int nt = 0; nt < R8; nt++) {
                const i64 k = c0 - pc0 + 64 * grp + 16 * ks + 2 * tig;  // B's row: the column within the part
                const int n = 8 * nt + gid;
                bf[ks][nt][0] = b_elem(bw, k, n, bj, bk, pcols) | (b_elem(bw, k + 1, n, bj, bk, pcols) << 16);
                bf[ks][nt][1] = b_elem(bw, k + 8, n, bj, bk, pcols) | (b_elem(bw, k + 9, n, bj, bk, pcols) << 16);
              }
            }
          }

          float accb[DM][R8][4];
        #pragma unroll
          for (int d = 0; d < DM; d++) {
        #pragma unroll
            for (int nt = 0; nt < R8; nt++) {
        #pragma unroll
              for (int i = 0; i < 4; i++) accb[d][nt][i] = 0.f;
            }
          }

          // Tile q of the block into stage st by cp.async: dy TT rows × CH chunks (4 a thread), xa TT rows × R8 chunks;
          // zeros (nothing read) outside the block's tokens and the strip's columns (cols is a multiple of 8: a chunk is
          // wholly in or out).
          const i64 tiles = (tEnd - tBegin + TT - 1) / TT;
          auto issue = [&](i64 q, int st) {
            const i64 t0 = tBegin + q * TT;
            const u32 sd = stages_a + static_cast<u32>(st * STAGE);
        #pragma unroll
            for (int i = 0; i < 4; i++) {
              const int c = tid + 256 * i, row = c / CH, ch = c % CH;
              const i64 tok = t0 + row, col = c0 + 8 * ch;
              const bool in = tok < tEnd && col < cols;
              copy16_async(sd + 2u * static_cast<u32>(row * DYS + 8 * ch), in ? dy + tok * ldy + (col - pc0) : dy, in);
            }
            if (withDb) {
        #pragma unroll
              for (int i = 0; i < XC; i++) {
                const int c = tid + 256 * i, row = c / R8, ch = c % R8;
                const i64 tok = t0 + row;
                const bool in = tok < tEnd;
                if (c < XCH) copy16_async(sd + static_cast<u32>(STAGE_DY) + 2u * static_cast<u32>(row * XS + 8 * ch), in ? xa + tok * ldx + 8 * ch : xa, in);
              }
            }
          };

          // NS - 1 tiles in flight ahead of the one multiplied; one commit group per tile (empty past the last), so that
          // wait_async<NS - 1> means: this thread's copies of tile it have landed.
        #pragma unroll
          for (int st = 0; st < NS - 1; st++) {
            if (st < tiles) issue(st, st);
            commit_async();
          }
          // Group 0's dxa of the previous tile, added to the other groups' (red) and written out after the next barrier:
          // one barrier per tile.
          float accp[DX ? R8 : 1][4];
          auto flush = [&](i64 t0, int b) {
        #pragma unroll
            for (int h = 0; h < 2; h++) {
              const i64 tok = t0 + 16 * mt + 8 * h + gid;
              if (tok < tEnd) {
                float* o = pxa + (static_cast<i64>(blockIdx.x) * rows + tok) * R;
        #pragma unroll
                for (int nt = 0; nt < R8; nt++) {
                  const int n = 8 * nt + 2 * tig;
                  float v0 = accp[nt][2 * h], v1 = accp[nt][2 * h + 1];
        #pragma unroll
                  for (int g = 0; g < G - 1; g++) {
                    v0 += red[at(b, g, mt, 8 * h + gid, n)];
                    v1 += red[at(b, g, mt, 8 * h + gid, n + 1)];
                  }
                  o[n] = v0;
                  o[n + 1] = v1;
                }
              }
            }
          };
          for (i64 it = 0; it < tiles; it++) {
            wait_async<NS - 2>();  // this thread's copies of tile it have landed
            __syncthreads();       // everyone's; and tile it - 1 is done: its stage free, its group sums in red
            if (it + NS - 1 < tiles) issue(it + NS - 1, static_cast<int>((it + NS - 1) % NS));  // into tile it - 1's stage
            commit_async();
            if constexpr (DX) {
              if (grp == 0 && it > 0) flush(tBegin + (it - 1) * TT, static_cast<int>((it - 1) & 1));
            }
            const u32 sdy_a = stages_a + static_cast<u32>((it % NS) * STAGE), sxa_a = sdy_a + static_cast<u32>(STAGE_DY);

            // dB += dyᵀ·xa over the tile's MT k-steps of 16 tokens. B (k: token, n: rank): matrices (tokens 0-7 | 8-15)
            // × (ranks of n-tile 2p | 2p + 1), transposed; A (m: column, k: token): matrices (columns 0-7 | 8-15) ×
            // (tokens 0-7 | 8-15) of the k-step, transposed.
            if (withDb) {
        #pragma unroll
              for (int kt = 0; kt < MT; kt++) {
                u32 xb[R8][2];
        #pragma unroll
                for (int p = 0; p < R8 / 2; p++) {
                  u32 x4[4];
                  ldsm_x4_t(x4, sxa_a + 2u * static_cast<u32>((16 * kt + 8 * (quad & 1) + r8) * XS + 8 * (2 * p + (quad >> 1))));
                  xb[2 * p][0] = x4[0];
                  xb[2 * p][1] = x4[1];
                  xb[2 * p + 1][0] = x4[2];
                  xb[2 * p + 1][1] = x4[3];
                }
        #pragma unroll
                for (int d = 0; d < DM; d++) {
                  u32 a[4];
                  ldsm_x4_t(a, sdy_a + 2u * static_cast<u32>((16 * kt + 8 * (quad >> 1) + r8) * DYS + 16 * (DM * warp + d) + 8 * (quad & 1)));
        #pragma unroll
                  for (int nt = 0; nt < R8; nt++) Mma<T>::run(accb[d][nt], a, xb[nt][0], xb[nt][1]);
                }
              }
            }

            if constexpr (DX) {
              // dxa of the warp's 16 tokens over its 64 columns. A (m: token, k: column): matrices (tokens 0-7 | 8-15) ×
              // (columns 0-7 | 8-15) of the k-step, as stored.
              float accx[R8][4];
        #pragma unroll
              for (int nt = 0; nt < R8; nt++) {
        #pragma unroll
                for (int i = 0; i < 4; i++) accx[nt][i] = 0.f;
              }
        #pragma unroll
              for (int ks = 0; ks < 4; ks++) {
                u32 a[4];
                ldsm_x4(a, sdy_a + 2u * static_cast<u32>((16 * mt + 8 * (quad & 1) + r8) * DYS + 64 * grp + 16 * ks + 8 * (quad >> 1)));
        #pragma unroll
                for (int nt = 0; nt < R8; nt++) Mma<T>::run(accx[nt], a, bf[ks][nt][0], bf[ks][nt][1]);
              }
              const int b = static_cast<int>(it & 1);
        #pragma unroll
              for (int nt = 0; nt < R8; nt++) {
                if (grp > 0) {
                  const int n = 8 * nt + 2 * tig;
                  red[at(b, grp - 1, mt, gid, n)] = accx[nt][0];
                  red[at(b, grp - 1, mt, gid, n + 1)] = accx[nt][1];
                  red[at(b, grp - 1, mt, gid + 8, n)] = accx[nt][2];
                  red[at(b, grp - 1, mt, gid + 8, n + 1)] = accx[nt][3];
                } else {
        #pragma unroll
                  for (int i = 0; i < 4; i++) accp[nt][i] = accx[nt][i];
                }
              }
            }
          }
          if constexpr (DX) {
            __syncthreads();  // the last tile's group sums
            if (grp == 0 && tiles > 0) flush(tBegin + (tiles - 1) * TT, static_cast<int>((tiles - 1) & 1));
          }
          wait_async<0>();  // no copy outlives the block (the trailing groups are empty)

          if (withDb) {
        #pragma unroll
            for (int d = 0; d < DM; d++) {
        #pragma unroll
              for (int h = 0; h < 2; h++) {
                const i64 j = c0 + 16 * (DM * warp + d) + 8 * h + gid;
                if (j < cols) {
                  float* o = pdb + (static_cast<i64>(blockIdx.y) * cols + j) * R;
        #pragma unroll
                  for (int nt = 0; nt < R8; nt++) {
                    const int n = 8 * nt + 2 * tig;
                    o[n] = accb[d][nt][2 * h];
                    o[n + 1] = accb[d][nt][2 * h + 1];
                  }
                }
              }
            }
          }
        }

        // dxa[t, p·r + k] = s_p·Σ_{strips of part p} pxa[., t, k] (rounded to T; row stride ldo; pxa null: none), then for
        // column j of part p, dB_p[j − start_p, k] = s_p·Σ_spans pdb[., j, k] (fp32 where bit p of dbF32 is set, else T;
        // at k·cols_p + j − start_p when dbT; none where db_p is null). One part: strip1 = strip2 = strips, start1 = start2
        // = cols. A thread per 4 consecutive outputs (r is a multiple of 16: they share a row and a part) adds their partials
        // in order with 16-byte loads, several in flight (a fixed order: the same bits on every run). Measured on an H200
        // (llama-1b LoRA step): 6.2 µs for q's or o's partials where a block per 32 outputs took 8; 4 or 8 threads per
        // output, each adding a share of the partials, were slower (10.5 against 8.1 µs on average).
        template <typename T>
        struct LrReduce {
          int strip[4];  // part p's strips: strip[p] .. strip[p + 1]
          i64 start[3];  // part p's first column
          float s[3];
          void* db[3];
        };

        // a / b for 0 ≤ a, 0 < b: 32-bit where a fits (a 64-bit division is a subroutine of ~70 instructions).
        __device__ __forceinline__ i64 lh_div(i64 a, int b) {
          return a <= 0xffffffffll ? static_cast<i64>(static_cast<unsigned>(a) / static_cast<unsigned>(b)) : a / b;
        }

        template <typename T>
        __device__ __forceinline__ void lowrank_reduce(const float* __restrict__ pxa, const float* __restrict__ pdb, int spans, i64 rows,
                                                       i64 cols, int r, int nparts, const LrReduce<T>& red, T* __restrict__ dxa,
                                                       i64 ldo, int dbF32, int dbT) {
          const int wx = nparts * r;  // dxa's width
          const i64 nx = pxa != nullptr ? rows * wx : 0, nb = pdb != nullptr ? cols * r : 0;
          const i64 i = 4 * (static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x);
          if (i >= nx + nb) return;
          const bool isX = i < nx;
          i64 at, row = 0, col = 0;
          int p = 0, first = 0, count = spans, n = 0;
          if (isX) {
            row = lh_div(i, wx);
            n = static_cast<int>(i - row * wx);
            p = nparts == 1 ? 0 : n / r;
            at = row * r + (n - p * r);
            first = p == 0 ? red.strip[0] : p == 1 ? red.strip[1] : red.strip[2];
            count = (p == 0 ? red.strip[1] : p == 1 ? red.strip[2] : red.strip[3]) - first;
          } else {
            at = i - nx;
            col = lh_div(at, r);
            p = lr_part(red.start, col);
          }
          void* const db = lh_pick(p, red.db);
          if (!isX && db == nullptr) return;
          const float4* src = reinterpret_cast<const float4*>((isX ? pxa : pdb) + at) + (isX ? static_cast<i64>(first) * rows * r / 4 : 0);
          const i64 step = (isX ? rows * r : nb) / 4;
          float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        #pragma unroll 8
          for (int c = 0; c < count; c++) {
            const float4 q = src[c * step];
            v.x += q.x;
            v.y += q.y;
            v.z += q.z;
            v.w += q.w;
          }
          const float s = lh_pick(p, red.s);
          const float t[4] = {v.x * s, v.y * s, v.z * s, v.w * s};
          if (isX) {
            T* o = dxa + row * ldo + n;
        #pragma unroll
            for (int e = 0; e < 4; e++) o[e] = Cvt<T>::from(t[e]);
          } else {
            const i64 pcols = lr_part_cols(red.start, p, cols);
            const i64 j = col - lh_pick(p, red.start), k = at - col * r;
        #pragma unroll
            for (int e = 0; e < 4; e++) {
              const i64 o = dbT ? (k + e) * pcols + j : j * r + k + e;
              if ((dbF32 >> p) & 1) {
                static_cast<float*>(db)[o] = t[e];
              } else {
                static_cast<T*>(db)[o] = Cvt<T>::from(t[e]);
              }
            }
          }
        }

        // MINB, TMINB: blocks of 256 threads per multiprocessor the register allocation of the bwd / tprod kernel aims at
        // (a cap: 3 → 80 registers, 2 → 128). ptxas -v (NVRTC 11.8, sm_90), bf16: bwd r16 m4 80 (44 bytes spilled; 106
        // uncapped), r16 m2 124, r32 m4 / m2 128 (16 / 60 spilled), r48 194 / 223, r64 220 / 254; tprod r16 80, r32 80 /
        // 122, r48 80 (44 spilled) / 128, r64 128 (measured before the kernels took LrParts). The kernels take LrParts and
        // LrReduce by value: one launch argument each.
        #define LH_LOWRANK_BWD_S(T, S, R8, RANK, MT, MINB, NS)                                                                \
          extern "C" __global__ void __launch_bounds__(256, MINB) lh_lowrank_bwd_##S##_r##RANK##_m##MT##_s##NS(               \
              i64 rows, i64 cols, LrParts<T> parts, float* pxa, float* pdb, i64 span) { lh_grid_dependency_sync();                                      \
            lowrank_backward<T, R8, MT, true, NS>(rows, cols, parts, pxa, pdb, span);                                         \
          }
        #define LH_LOWRANK_BWD(T, S, R8, RANK, MT, MINB, TMINB)                                                               \
          LH_LOWRANK_BWD_S(T, S, R8, RANK, MT, MINB, 3)                                                                       \
          extern "C" __global__ void __launch_bounds__(256, TMINB) lh_lowrank_tprod_##S##_r##RANK##_m##MT##_s3(               \
              i64 rows, i64 cols, LrParts<T> parts, float* pdb, i64 span) { lh_grid_dependency_sync();                                                  \
            lowrank_backward<T, R8, MT, false, 3>(rows, cols, parts, nullptr, pdb, span);                                     \
          }

        #define LH_LOWRANK_ALL(T, S)                                                                                          \
          LH_LOWRANK_BWD(T, S, 2, 16, 4, 3, 3)                                                                                \
          LH_LOWRANK_BWD(T, S, 2, 16, 2, 2, 3)                                                                                \
          LH_LOWRANK_BWD_S(T, S, 2, 16, 4, 3, 2)                                                                              \
          LH_LOWRANK_BWD_S(T, S, 2, 16, 4, 2, 4)                                                                              \
          LH_LOWRANK_BWD_S(T, S, 2, 16, 2, 2, 2)                                                                              \
          LH_LOWRANK_BWD_S(T, S, 2, 16, 2, 2, 4)                                                                              \
          LH_LOWRANK_BWD(T, S, 4, 32, 4, 2, 3)                                                                                \
          LH_LOWRANK_BWD(T, S, 4, 32, 2, 2, 2)                                                                                \
          LH_LOWRANK_BWD(T, S, 6, 48, 4, 1, 3)                                                                                \
          LH_LOWRANK_BWD(T, S, 6, 48, 2, 1, 2)                                                                                \
          LH_LOWRANK_BWD(T, S, 8, 64, 4, 1, 2)                                                                                \
          LH_LOWRANK_BWD(T, S, 8, 64, 2, 1, 2)                                                                                \
          extern "C" __global__ void lh_lowrank_reduce_##S(const float* pxa, const float* pdb, int spans, i64 rows, i64 cols, \
                                                            int r, int nparts, LrReduce<T> red, T* dxa, i64 ldo, int dbF32,   \
                                                            int dbT) { lh_grid_dependency_sync();                                                        \
            lowrank_reduce<T>(pxa, pdb, spans, rows, cols, r, nparts, red, dxa, ldo, dbF32, dbT);                             \
          }

        // Instantiated per program: LH_LOWRANK_ALL(bf16, bf16) or LH_LOWRANK_ALL(f16, f16) is appended.

        """;
}
