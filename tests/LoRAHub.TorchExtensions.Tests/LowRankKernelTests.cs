using LoRAHub.TorchExtensions.Modules;
using TorchSharp.Modules;
using Block = LoRAHub.TorchExtensions.Tests.FixtureBlock;
using LowRank = LoRAHub.TorchExtensions.Tests.LowRankFixture;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The LoRA blocks' thin-product kernels (<see cref="LowRankKernels"/>: dxa = s·dy·B and dB = s·dyᵀ·xa from one read of
/// dy; s·yᵀ·t alone, transposed or not) against an fp64 reference: bf16 and fp16, ranks 16..64, both
/// tile shapes, token counts that are not a multiple of the tile, widths that are not a multiple of the column strip, a
/// strided xa (a column block of the stacked thin product), a transposed B, dxa written into a column block of a wider
/// buffer, several token spans per block, bit-identical reruns; and the fused q/k/v block through them against the GEMM
/// path and the composite ops. On CUDA (LORAHUB_TEST_DEVICE=cuda) the kernels must run where they apply (launches
/// counted: a silent fallback fails) and must not where they do not; elsewhere they never apply, and the block still
/// matches (the GEMM path). The llama-1b-shape tests run on CUDA only (gpu-lowrank.sh times them under Nsight Compute).
/// </summary>
[Collection(KernelTestsCollection.Name)] // toggles LowRankKernels' switch and launch shape, counts its launches (process-wide)
public class LowRankKernelTests
{
    private static readonly Device Dev = TestDevice.Current;

    [Theory]
    // dtype, tokens, width n, rank, xa's stacked width (0: xa contiguous; else xa is columns [rank, 2·rank) of it), dB in fp32,
    // B transposed in memory, xa given (false: dxa only), blocks per multiprocessor (0: as many as fit), tokens per tile (0: by
    // shape), stages (0: the default)
    [InlineData(ScalarType.BFloat16, 1, 8, 16, 0, true, false, true, 0, 0, 0)]
    [InlineData(ScalarType.BFloat16, 75, 136, 16, 48, true, false, true, 3, 64, 0)]
    [InlineData(ScalarType.BFloat16, 75, 136, 16, 48, true, false, true, 3, 32, 0)]
    [InlineData(ScalarType.BFloat16, 200, 264, 32, 0, false, true, true, 3, 0, 0)]
    [InlineData(ScalarType.BFloat16, 200, 520, 32, 0, true, true, true, 1, 32, 0)]
    [InlineData(ScalarType.Float16, 131, 520, 48, 96, true, false, true, 3, 64, 0)]
    [InlineData(ScalarType.Float16, 131, 520, 48, 96, false, false, true, 2, 32, 0)]
    [InlineData(ScalarType.BFloat16, 64, 128, 64, 128, true, true, true, 2, 64, 0)]
    [InlineData(ScalarType.BFloat16, 97, 392, 64, 0, true, false, true, 4, 32, 0)]
    [InlineData(ScalarType.BFloat16, 1000, 2056, 16, 48, true, false, true, 1, 0, 0)]
    [InlineData(ScalarType.BFloat16, 1000, 2056, 16, 48, true, false, true, 0, 32, 0)]
    [InlineData(ScalarType.Float16, 517, 384, 16, 0, false, false, true, 16, 32, 0)]
    [InlineData(ScalarType.BFloat16, 333, 200, 48, 0, true, false, false, 3, 0, 0)]
    [InlineData(ScalarType.BFloat16, 1000, 2056, 16, 48, true, false, true, 1, 64, 2)]
    [InlineData(ScalarType.BFloat16, 1000, 2056, 16, 48, true, false, true, 1, 64, 4)]
    [InlineData(ScalarType.Float16, 517, 520, 16, 0, false, false, true, 1, 32, 2)]
    [InlineData(ScalarType.BFloat16, 517, 520, 16, 0, true, true, true, 2, 32, 4)]
    public void Kernels_match_an_fp64_reference(ScalarType dtype, long tokens, long n, long rank, long stacked, bool dbF32,
        bool bTransposed, bool withXa, int blocksPerSm, int tileTokens, int stages)
    {
        var gen = new Generator((ulong)(7 + tokens + n + rank));
        var dy = randn([tokens, n], generator: gen).to(dtype).to(Dev);
        // B as LoRA's (n × r); in memory as the transpose of an r × n tensor where asked (strides 1, n).
        var b = bTransposed ? randn([rank, n], generator: gen).to(dtype).to(Dev).t() : randn([n, rank], generator: gen).to(dtype).to(Dev);
        var xaAll = randn([tokens, stacked > 0 ? stacked : rank], generator: gen).to(dtype).to(Dev);
        var xa = stacked > 0 ? xaAll.narrow(1, rank, rank) : xaAll;
        var scale = 2.0 / rank;
        if (!TestDevice.IsCuda)
        {
            Assert.False(LowRankKernels.Applies(dy, b, xa));
            return;
        }
        Assert.True(LowRankKernels.Applies(dy, b, withXa ? xa : null), LowRankKernels.Report);

        // dxa into columns [rank, 2·rank) of a buffer whose other columns must stay as they were.
        var buffer = full([tokens, 3 * rank], 7.0, dtype: dtype, device: Dev);
        var before = LowRankKernels.Launches;
        var (blocks, tile, stagesBefore) = (LowRankKernels.BlocksPerSm, LowRankKernels.TileTokens, LowRankKernels.Stages);
        if (stages != 0) LowRankKernels.Stages = stages;
        LowRankKernels.BlocksPerSm = blocksPerSm == 0 ? null : blocksPerSm;
        LowRankKernels.TileTokens = tileTokens == 0 ? null : tileTokens;
        Tensor dxa, dxa2;
        Tensor? db, db2;
        try
        {
            (dxa, db) = LowRankKernels.Backward(dy, b, withXa ? xa : null, scale, buffer.narrow(1, rank, rank),
                dbF32 ? ScalarType.Float32 : null);
            // Again into a new tensor: the same bits (fixed-order sums, no atomics).
            (dxa2, db2) = LowRankKernels.Backward(dy, b, withXa ? xa : null, scale, null, dbF32 ? ScalarType.Float32 : null);
        }
        finally
        {
            (LowRankKernels.BlocksPerSm, LowRankKernels.TileTokens, LowRankKernels.Stages) = (blocks, tile, stagesBefore);
        }
        Assert.Equal(before + 2, LowRankKernels.Launches);
        Assert.Equal(dtype, dxa.dtype);
        Assert.True(buffer.narrow(1, 0, rank).eq(7.0).all().item<bool>() && buffer.narrow(1, 2 * rank, rank).eq(7.0).all().item<bool>(),
            "dxa wrote outside its column block");

        var (dyD, bD, xaD) = (dy.to(ScalarType.Float64), b.to(ScalarType.Float64), xa.to(ScalarType.Float64));
        // dxa is rounded once to dtype: half an ulp (2^-9 bf16, 2^-12 fp16) plus fp32 accumulation.
        var rtol = dtype == ScalarType.BFloat16 ? 4e-3 : 1e-3;
        FusedKernelTests.AssertClose(dxa, dyD.mm(bD) * scale, rtol, 1e-4, "dxa");
        Assert.True(Exact.Equal(dxa2, dxa), "dxa differs between runs");
        if (!withXa)
        {
            Assert.Null(db);
            return;
        }
        Assert.NotNull(db);
        Assert.Equal(dbF32 ? ScalarType.Float32 : dtype, db!.dtype);
        Assert.Equal(new[] { n, rank }, db.shape);
        FusedKernelTests.AssertClose(db, dyD.t().mm(xaD) * scale, dbF32 ? 1e-5 : rtol, 1e-4, "dB");
        Assert.True(Exact.Equal(db2!, db), "dB differs between runs");
    }

    [Theory]
    // dtype, tokens, width n, rank, transposed output, fp32 output, tokens per tile (0: by shape)
    [InlineData(ScalarType.BFloat16, 75, 136, 48, true, true, 0)]
    [InlineData(ScalarType.BFloat16, 75, 136, 48, false, false, 32)]
    [InlineData(ScalarType.Float16, 300, 264, 16, true, false, 64)]
    [InlineData(ScalarType.BFloat16, 1000, 2048, 64, true, true, 0)]
    [InlineData(ScalarType.BFloat16, 129, 1032, 32, false, true, 32)]
    public void Transposed_product_matches_an_fp64_reference(ScalarType dtype, long tokens, long n, long rank, bool transposed, bool f32,
        int tileTokens)
    {
        var gen = new Generator((ulong)(5 + tokens + n + rank));
        var y = randn([tokens, n], generator: gen).to(dtype).to(Dev);
        var t = randn([tokens, rank], generator: gen).to(dtype).to(Dev);
        if (!TestDevice.IsCuda)
        {
            Assert.False(LowRankKernels.TransposedProductApplies(y, t));
            return;
        }
        Assert.True(LowRankKernels.TransposedProductApplies(y, t), LowRankKernels.Report);
        var before = LowRankKernels.Launches;
        var tile = LowRankKernels.TileTokens;
        LowRankKernels.TileTokens = tileTokens == 0 ? null : tileTokens;
        Tensor got;
        try
        {
            got = LowRankKernels.TransposedProduct(y, t, 0.5, transposed, f32 ? ScalarType.Float32 : null);
        }
        finally
        {
            LowRankKernels.TileTokens = tile;
        }
        Assert.Equal(before + 1, LowRankKernels.Launches);
        Assert.Equal(f32 ? ScalarType.Float32 : dtype, got.dtype);
        var expected = y.to(ScalarType.Float64).t().mm(t.to(ScalarType.Float64)) * 0.5;
        FusedKernelTests.AssertClose(got, transposed ? expected.t() : expected, f32 ? 1e-5 : dtype == ScalarType.BFloat16 ? 4e-3 : 1e-3, 1e-4,
            "s·yᵀ·t");
    }

    [Fact]
    public void Stacked_backward_puts_each_dxa_in_its_column_block_or_leaves_all_to_the_gemms()
    {
        var gen = new Generator(23);
        const long tokens = 75;
        var xaAll = randn([tokens, 48], generator: gen).to(ScalarType.BFloat16).to(Dev);
        LowRankKernels.Part Part(long n, long rank, long offset, double scale) => new(randn([tokens, n], generator: gen).to(ScalarType.BFloat16).to(Dev),
            randn([n, rank], generator: gen).to(ScalarType.BFloat16).to(Dev), xaAll.narrow(1, offset, rank), scale, ScalarType.Float32);
        var parts = new[] { Part(136, 16, 0, 0.5), Part(40, 32, 16, 2.0) };
        var upTo = LowRankKernels.FasterUpToRank;
        LowRankKernels.FasterUpToRank = 16;
        try
        {
            // Rank 32 is beyond what the blocks take by default: the GEMMs for all.
            Assert.Null(LowRankKernels.StackedBackward(parts));
            LowRankKernels.FasterUpToRank = 32;
            Stacked(parts);
        }
        finally
        {
            LowRankKernels.FasterUpToRank = upTo;
        }
    }

    [Theory]
    // Part widths (each part's first column a multiple of 256: either tile), tokens per tile (0: by shape); the parts
    // adjacent column blocks of one buffer, then apart.
    [InlineData(new long[] { 512, 256, 256 }, 0)]
    [InlineData(new long[] { 256, 264 }, 64)]
    [InlineData(new long[] { 1024, 512, 512 }, 32)]
    public void Parts_go_through_one_launch_and_match_a_launch_per_part(long[] widths, int tileTokens)
    {
        if (!TestDevice.IsCuda) return; // the kernels' launch shape
        var gen = new Generator(41);
        const long tokens = 333;
        var all = randn([tokens, widths.Sum()], generator: gen).to(ScalarType.BFloat16).to(Dev);
        var xaAll = randn([tokens, 16 * widths.Length], generator: gen).to(ScalarType.BFloat16).to(Dev);
        var parts = new LowRankKernels.Part[widths.Length];
        long start = 0;
        for (var p = 0; p < widths.Length; p++)
        {
            // Part 1 wants no B gradient; part 0's comes in bf16, the others' in fp32; each its own scale.
            parts[p] = new(all.narrow(1, start, widths[p]), randn([widths[p], 16], generator: gen).to(ScalarType.BFloat16).to(Dev),
                p == 1 ? null : xaAll.narrow(1, 16 * p, 16), 0.5 + p, p == 0 ? null : ScalarType.Float32);
            start += widths[p];
        }
        var (grouped, tile) = (LowRankKernels.Grouped, LowRankKernels.TileTokens);
        LowRankKernels.TileTokens = tileTokens == 0 ? null : tileTokens;
        try
        {
            LowRankKernels.Grouped = false;
            var (dxaApart, dbApart) = LowRankKernels.StackedBackward(parts)!.Value;
            LowRankKernels.Grouped = true;
            var (launches, groupedBefore) = (LowRankKernels.Launches, LowRankKernels.GroupedLaunches);
            var (dxa, db) = LowRankKernels.StackedBackward(parts)!.Value;
            Assert.Equal((launches + 1, groupedBefore + 1), (LowRankKernels.Launches, LowRankKernels.GroupedLaunches));
            // dxa: the same strips in the same order (the same bits where the tile is the same); dB: other token spans,
            // so its fp32 sums differ in order only.
            Assert.True(Close(dxa, dxaApart, 8e-3), "dxa");
            for (var p = 0; p < parts.Length; p++)
            {
                Assert.Equal(p == 1, db[p] is null);
                if (db[p] is not { } d) continue;
                Assert.Equal(p == 0 ? ScalarType.BFloat16 : ScalarType.Float32, d.dtype);
                Assert.True(Close(d, dbApart[p]!, p == 0 ? 8e-3 : 1e-5), $"dB of part {p}");
            }
            // Apart (each part its own tensor, with its own row stride): one launch too, the same results bit for bit.
            var apart = parts.Select((q, i) => q with
            {
                Dy = i == 1 ? q.Dy.contiguous() : cat([q.Dy, zeros_like(q.Dy.narrow(1, 0, 8))], 1).narrow(1, 0, q.Dy.size(1)),
            }).ToArray();
            groupedBefore = LowRankKernels.GroupedLaunches;
            var (dxaApart2, dbApart2) = LowRankKernels.StackedBackward(apart)!.Value;
            Assert.Equal(groupedBefore + 1, LowRankKernels.GroupedLaunches);
            Assert.True(Exact.Equal(dxaApart2, dxa), "dxa, parts apart");
            for (var p = 0; p < parts.Length; p++)
                if (db[p] is { } d) Assert.True(Exact.Equal(dbApart2[p]!, d), $"dB of part {p}, parts apart");
        }
        finally
        {
            (LowRankKernels.Grouped, LowRankKernels.TileTokens) = (grouped, tile);
        }

        static bool Close(Tensor a, Tensor b, double rel)
        {
            var (x, y) = (a.to(ScalarType.Float64), b.to(ScalarType.Float64));
            return ((x - y).abs() - y.abs() * rel - 1e-6).max().item<double>() <= 0;
        }
    }

    private static void Stacked(LowRankKernels.Part[] parts)
    {
        var gen = new Generator(29);
        const long tokens = 75;
        var stacked = LowRankKernels.StackedBackward(parts);
        Assert.Equal(TestDevice.IsCuda, stacked is not null);
        // A part the kernels do not take (rank 8): none runs.
        var before = LowRankKernels.Launches;
        Assert.Null(LowRankKernels.StackedBackward([parts[0], parts[1] with { B = randn([40, 8], generator: gen).to(ScalarType.BFloat16).to(Dev),
            Xa = parts[1].Xa!.narrow(1, 0, 8) }]));
        Assert.Equal(before, LowRankKernels.Launches);
        if (stacked is not var (dxa, db)) return;
        Assert.Equal(new[] { tokens, 48L }, dxa.shape);
        long offset = 0;
        for (var i = 0; i < parts.Length; i++)
        {
            // The same launch as a lone call: the same bits.
            var (alone, dbAlone) = LowRankKernels.Backward(parts[i].Dy, parts[i].B, parts[i].Xa, parts[i].Scale, null, ScalarType.Float32);
            Assert.True(Exact.Equal(dxa.narrow(1, offset, parts[i].B.size(1)), alone), $"dxa of part {i}");
            Assert.True(Exact.Equal(db[i]!, dbAlone!), $"dB of part {i}");
            offset += parts[i].B.size(1);
        }
    }

    [Fact]
    public void Inputs_that_do_not_fit_are_left_to_the_gemms()
    {
        var dy = randn([70, 136], dtype: ScalarType.BFloat16, device: Dev);
        var b = randn([136, 16], dtype: ScalarType.BFloat16, device: Dev);
        var xa = randn([70, 16], dtype: ScalarType.BFloat16, device: Dev);
        Assert.Equal(TestDevice.IsCuda, LowRankKernels.Applies(dy, b, xa));
        // fp32, a rank that is not a multiple of 16, a width that is not a multiple of 8, a non-contiguous dy, mixed dtypes.
        Assert.False(LowRankKernels.Applies(dy.to(ScalarType.Float32), b.to(ScalarType.Float32), xa.to(ScalarType.Float32)));
        Assert.False(LowRankKernels.Applies(dy, b.narrow(1, 0, 8), xa.narrow(1, 0, 8)));
        Assert.False(LowRankKernels.Applies(dy.narrow(1, 0, 130), b.narrow(0, 0, 130), xa));
        Assert.False(LowRankKernels.Applies(dy.t().contiguous().t(), b, xa));
        Assert.False(LowRankKernels.Applies(dy, b.to(ScalarType.Float16), xa));
        Assert.False(LowRankKernels.Applies(dy, randn([136, 80], dtype: ScalarType.BFloat16, device: Dev), null));
        Assert.Equal(TestDevice.IsCuda, LowRankKernels.TransposedProductApplies(dy, xa));
        Assert.False(LowRankKernels.TransposedProductApplies(dy, xa.narrow(1, 0, 8)));
        Assert.False(LowRankKernels.TransposedProductApplies(dy, randn([70, 80], dtype: ScalarType.BFloat16, device: Dev)));
        var enabled = LowRankKernels.Enabled;
        LowRankKernels.Enabled = false;
        try
        {
            Assert.False(LowRankKernels.Applies(dy, b, xa));
        }
        finally
        {
            LowRankKernels.Enabled = enabled;
        }
    }


    [Theory]
    // dtype, ranks of q, k, v, tokens, kernels expected on CUDA
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 75, true)]
    [InlineData(ScalarType.BFloat16, 32, 0, 48, 131, true)]
    [InlineData(ScalarType.Float16, 64, 16, 0, 9, true)]
    // Not taken (the GEMM path, still matching): a rank that is not a multiple of 16 (then no projection takes them), fp32.
    [InlineData(ScalarType.BFloat16, 16, 8, 16, 75, false)]
    [InlineData(ScalarType.Float32, 16, 16, 16, 75, false)]
    public void Qkv_block_through_the_kernels_matches_the_gemm_path_and_the_composite_ops(ScalarType dtype, int rq, int rk, int rv,
        long tokens, bool kernel)
    {
        const long hidden = 64, qOut = 136, kvOut = 40;
        var gen = new Generator((ulong)(19 + rq + rk + rv + tokens));
        using var q = new LowRank(hidden, qOut, rq, dtype, gen);
        using var k = new LowRank(hidden, kvOut, rk, dtype, gen);
        using var v = new LowRank(hidden, kvOut, rv, dtype, gen);
        var trainable = q.Trainable().Concat(k.Trainable()).Concat(v.Trainable()).ToList();
        var block = new Block();
        var x0 = randn([1, tokens, hidden], generator: gen).to(dtype).to(Dev);
        var dys = new[] { qOut, kvOut, kvOut }.Select(o => randn([1, tokens, o], generator: gen).to(dtype).to(Dev)).ToArray();
        kernel = kernel && TestDevice.IsCuda;

        (Tensor[] ys, Tensor dx, Tensor[] grads) Run(Func<Tensor, Tensor[]> f)
        {
            foreach (var p in trainable) p.grad = null;
            var x = x0.detach().clone().requires_grad_(true);
            var ys = f(x);
            ys.Zip(dys, (y, d) => (y.to(ScalarType.Float32) * d.to(ScalarType.Float32)).sum()).Aggregate((l, r) => l + r).backward();
            return (ys.Select(y => y.detach()).ToArray(), x.grad!.detach().clone(), trainable.Select(p => p.grad!.detach().clone()).ToArray());
        }

        Tensor[] Fused(Tensor x) => LoraFusion.TryQkv(block, q, k, v, x, fused: true) is var (a, b, c) ? [a, b, c]
            : throw new Xunit.Sdk.XunitException($"not fused: {LoraFusionPaths.Of(block)}");

        var before = LowRankKernels.Launches;
        // Every rank the kernels take (the blocks' default takes rank 16 only, where they are measured faster).
        var upTo = LowRankKernels.FasterUpToRank;
        LowRankKernels.FasterUpToRank = LowRankKernels.MaxRank;
        (Tensor[] ys, Tensor dx, Tensor[] grads) viaKernel;
        try
        {
            viaKernel = Run(Fused);
        }
        finally
        {
            LowRankKernels.FasterUpToRank = upTo;
        }
        // One launch per projection with an update.
        Assert.Equal(before + (kernel ? new[] { rq, rk, rv }.Count(r => r > 0) : 0), LowRankKernels.Launches);
        var enabled = LowRankKernels.Enabled;
        LowRankKernels.Enabled = false;
        (Tensor[] ys, Tensor dx, Tensor[] grads) viaGemms;
        try
        {
            viaGemms = Run(Fused);
        }
        finally
        {
            LowRankKernels.Enabled = enabled;
        }
        var composite = Run(x => [q.call(x), k.call(x), v.call(x)]);

        var (rtol, atol) = dtype == ScalarType.Float32 ? (2e-5, 2e-5) : (3e-2, 3e-2);
        foreach (var (other, what) in new[] { (viaGemms, "GEMM path"), (composite, "composite ops") })
        {
            for (var i = 0; i < 3; i++) FusedKernelTests.AssertClose(viaKernel.ys[i], other.ys[i], rtol, atol, $"output {i} vs the {what}");
            FusedKernelTests.AssertClose(viaKernel.dx, other.dx, rtol, atol, $"dx vs the {what}");
            for (var i = 0; i < trainable.Count; i++)
            {
                Assert.Equal(trainable[i].dtype, viaKernel.grads[i].dtype);
                FusedKernelTests.AssertClose(viaKernel.grads[i], other.grads[i], rtol, atol, $"gradient of trainable tensor {i} vs the {what}");
            }
        }
    }

    [Theory]
    // llama-1b's shapes at 4 × 2048 tokens: q / o (n 2048), k / v (512), the MLP's gate / up (8192); ranks 16 and 48.
    [InlineData(2048, 16)]
    [InlineData(512, 16)]
    [InlineData(8192, 16)]
    [InlineData(2048, 48)]
    [InlineData(8192, 48)]
    [Trait("Category", "LlamaShapes")]
    public void Llama_1b_shapes_match_the_gemms(long n, long rank)
    {
        // CUDA only (the shapes are for timing there under Nsight Compute: gpu-lowrank.sh; the GEMMs run beside them).
        if (!TestDevice.IsCuda) return;
        const long tokens = 8192;
        var gen = new Generator((ulong)(n + rank));
        var dy = (randn([tokens, n], generator: gen) * 1e-3).to(ScalarType.BFloat16).to(Dev);
        var b = randn([n, rank], generator: gen).to(ScalarType.BFloat16).to(Dev);
        var xa = randn([tokens, 3 * rank], generator: gen).to(ScalarType.BFloat16).to(Dev).narrow(1, rank, rank);
        var scale = 2.0 / rank;
        Assert.True(LowRankKernels.Applies(dy, b, xa), LowRankKernels.Report);
        Tensor dxa = null!, db = null!, dxaRef = null!, dbRef = null!;
        for (var i = 0; i < 3; i++)
        {
            (dxa, var d) = LowRankKernels.Backward(dy, b, xa, scale, null, ScalarType.Float32);
            db = d!;
            dxaRef = torchx.mm(dy, b, scale);
            dbRef = torchx.mm(dy.t(), xa, scale);
        }
        // Both sides within bf16 rounding of the exact products (the GEMM rounds dB to bf16 too).
        FusedKernelTests.AssertClose(dxa, dxaRef, 1e-2, 1e-3, "dxa");
        FusedKernelTests.AssertClose(db, dbRef, 1e-2, 1e-3, "dB");
    }

    [Theory]
    // llama-1b's A gradients at 4 × 2048 tokens: q/k/v stacked (rank 48) and o (16) from x of width 2048, down (16) from h (8192).
    [InlineData(2048, 48)]
    [InlineData(2048, 16)]
    [InlineData(8192, 16)]
    [Trait("Category", "LlamaShapes")]
    public void Llama_1b_a_gradients_match_the_gemm(long d, long rank)
    {
        if (!TestDevice.IsCuda) return;
        const long tokens = 8192;
        var gen = new Generator((ulong)(d + rank + 1));
        var x = randn([tokens, d], generator: gen).to(ScalarType.BFloat16).to(Dev);
        var dxa = (randn([tokens, rank], generator: gen) * 1e-2).to(ScalarType.BFloat16).to(Dev);
        Assert.True(LowRankKernels.TransposedProductApplies(x, dxa), LowRankKernels.Report);
        Tensor da = null!, daRef = null!;
        for (var i = 0; i < 3; i++)
        {
            da = LowRankKernels.TransposedProduct(x, dxa, 1, transposed: true, ScalarType.Float32);
            daRef = dxa.t().mm(x);
        }
        FusedKernelTests.AssertClose(da, daRef, 1e-2, 1e-3, "dA");
    }
}
