using LoRAHub.TorchExtensions.Cuda;
using LowRank = LoRAHub.TorchExtensions.Tests.LowRankFixture;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The variant kernels of the LoRA MLP (<see cref="LoraMlpKernels.Variants"/>, <see cref="LoraMlpKernelVariant"/>): other
/// stages, copy flags and register caps of the pipelined kernels, which must give today's kernels' bits exactly (forward h;
/// backward dg, du, h and DoRA's scale gradients; the approximate and the exact sigmoid; partial tiles and column strips;
/// several blocks of tokens and one wave), must be taken where every term has rank 16 (launches counted: a silent fallback
/// fails) and only there, and must compile (NVRTC, where the library is present, also without a GPU).
/// </summary>
[Collection(KernelTestsCollection.Name)] // sets LoraMlpKernels' switches and counts its launches (process-wide)
public class LoraMlpKernelVariantTests : IDisposable
{
    private static readonly Device Dev = TestDevice.Current;

    // The variants under test apply with and without DoRA's row scales (RowScaleVariants null), restored after each test.
    private readonly (LoraMlpKernelVariant?, LoraMlpKernelVariant?)? rowScaleVariants = LoraMlpKernels.RowScaleVariants;

    public LoraMlpKernelVariantTests() => LoraMlpKernels.RowScaleVariants = null;

    public void Dispose() => LoraMlpKernels.RowScaleVariants = rowScaleVariants;

    [Fact]
    public void Variants_parse_from_their_names()
    {
        var v = LoraMlpKernelVariant.Parse("s3v2b4");
        Assert.Equal((3, 2, 4), (v!.Value.Stages, v.Value.Flags, v.Value.Blocks));
        Assert.True(v.Value.CopiesThinRows);
        Assert.Equal("s3v2b4", v.Value.ToString());
        Assert.False(LoraMlpKernelVariant.Parse("s2v1b3")!.Value.CopiesThinRows);
        foreach (var no in new[] { null, "", "0", "s5v0b4", "s2v32b3", "s2v0b5", "s1v0b4", "s2v0" })
            Assert.Null(LoraMlpKernelVariant.Parse(no));
        Assert.Equal((LoraMlpKernelVariant.Parse("s2v0b4"), LoraMlpKernelVariant.Parse("s3v1b3")), LoraMlpKernelVariant.ParsePair("s2v0b4,s3v1b3"));
        Assert.Equal((LoraMlpKernelVariant.Parse("s3v1b3"), LoraMlpKernelVariant.Parse("s3v1b3")), LoraMlpKernelVariant.ParsePair("s3v1b3"));
        Assert.Equal((null, LoraMlpKernelVariant.Parse("s3v1b3")), LoraMlpKernelVariant.ParsePair("0,s3v1b3"));
        Assert.Equal(10, LoraMlpKernelVariant.Parse("s2v10b3")!.Value.Flags);
        var rows = LoraMlpKernelVariant.Parse("s2v11b3@128")!.Value;
        Assert.Equal((128, "s2v11b3", "s2v11b3@128"), (rows.Rows, rows.Name, rows.ToString()));
        Assert.Equal(128, rows.WithoutDownAGrad.Rows);
        Assert.Equal(0, LoraMlpKernelVariant.Parse("s2v11b3")!.Value.Rows);
        foreach (var no in new[] { "s2v11b3@100", "s2v11b3@2048", "s2v11b3@", "s2v11b3@0" })
            Assert.Null(LoraMlpKernelVariant.Parse(no));
        Assert.Throws<ArgumentOutOfRangeException>(() => new LoraMlpKernelVariant(5, 0, 4));
    }

    [Theory]
    // forward and backward variant, dtype, approximate sigmoid
    [InlineData("s3v3b4", "s3v11b2", ScalarType.BFloat16, true)]
    [InlineData("s2v17b3", "s2v1b3", ScalarType.Float16, false)]
    public void Variant_sources_compile_with_nvrtc(string forward, string backward, ScalarType dtype, bool fast)
    {
        // Without NVRTC nothing to check; on CUDA the other tests compile them (and load them).
        if (Nvrtc.EnsureLoaded() is not null || TestDevice.IsCuda) return;
        var t = dtype == ScalarType.BFloat16 ? "bf16" : "f16";
        foreach (var (op, name) in new[] { ("fwd", forward), ("bwd", backward) })
        {
            var source = LoraMlpKernels.VariantSource(op, LoraMlpKernelVariant.Parse(name)!.Value, t, fast);
            var image = Nvrtc.Compile($"variant_{op}_{name}.cu", source, CudaKernels.Headers, 90, []);
            Assert.NotEmpty(image);
        }
    }

    [Theory]
    // dtype, tokens, width, forward and backward variant, approximate sigmoid, DoRA's row scales, tokens per block (0: one
    // wave), h wanted
    [InlineData(ScalarType.BFloat16, 150L, 136L, "s2v0b4", "s2v0b3", true, false, 64, true)]
    [InlineData(ScalarType.BFloat16, 300L, 520L, "s3v1b4", "s3v1b3", true, true, 128, true)]
    [InlineData(ScalarType.BFloat16, 37L, 264L, "s2v2b4", "s2v2b3", false, false, 16, false)]
    [InlineData(ScalarType.BFloat16, 70L, 72L, "s3v3b3", "s2v2b3", true, true, 48, true)]
    [InlineData(ScalarType.Float16, 150L, 264L, "s3v2b3", "s3v0b4", true, false, 64, true)]
    [InlineData(ScalarType.Float16, 9L, 136L, "s3v0b4", "s2v1b3", false, true, 16, true)]
    [InlineData(ScalarType.BFloat16, 3000L, 264L, "s3v1b4", "s3v1b3", true, false, 0, true)]
    [InlineData(ScalarType.BFloat16, 2000L, 136L, "s2v3b4", "s2v3b3", false, false, 0, false)] // one wave: no row scales (their per-block sums follow the grid)
    [InlineData(ScalarType.BFloat16, 333L, 1032L, "s4v1b3", "s4v1b2", true, true, 32, true)]
    [InlineData(ScalarType.BFloat16, 300L, 264L, "s3v5b3", "s3v5b2", true, true, 64, true)]
    [InlineData(ScalarType.Float16, 77L, 136L, "s2v4b4", "s3v5b3", false, false, 32, true)]
    [InlineData(ScalarType.BFloat16, 300L, 264L, "s3v1b4@32", "s2v3b3@128", true, false, 64, true)] // their own tokens per block
    public void Variant_kernels_give_todays_bits(ScalarType dtype, long rows, long cols, string forward, string backward, bool fast,
        bool rowScales, int rowsPerBlock, bool wantH)
    {
        if (!TestDevice.IsCuda)
        {
            using var z = zeros([16, 16], dtype);
            Assert.False(LoraMlpKernels.Applies("silu", z, z, 16, 16, 16));
            return;
        }
        using var scope = NewDisposeScope();
        var gen = new Generator(131);
        Tensor R(long[] shape, double scale = 1) => (randn(shape, ScalarType.Float32, generator: gen) * scale).to(dtype).to(Dev);
        var (g, u, dh) = (R([rows, cols]), R([rows, cols]), R([rows, cols]));
        var (xa, xd) = (R([rows, 32]), R([rows, 16], 0.5));
        var (bg, bu, ad) = (R([cols, 16]), R([cols, 16]), R([16, cols], 0.5));
        var (xg, xu) = (xa.narrow(1, 0, 16), xa.narrow(1, 16, 16));
        var (cg, cu) = rowScales ? (1 + 0.1 * randn([cols], generator: gen).to(Dev), 1 + 0.1 * randn([cols], generator: gen).to(Dev)) : (null, null);
        Assert.True(LoraMlpKernels.Applies("silu", g, u, 16, 16, 16)); // as the MLP asks first (loads NVRTC, compiles)

        // Forward h, then backward's dg, du (h) and the scales' gradients, on copies (backward writes over dh, g, u).
        Tensor[] Run((LoraMlpKernelVariant?, LoraMlpKernelVariant?) variants)
        {
            var before = (LoraMlpKernels.Variants, LoraMlpKernels.FastSigmoid, LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages);
            (LoraMlpKernels.Variants, LoraMlpKernels.FastSigmoid) = (variants, fast);
            (LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages) = ((rowsPerBlock, rowsPerBlock), (2, 2));
            try
            {
                var h = LoraMlpKernels.Forward(g, u, xg, bg, 0.25, xu, bu, 0.25, cg, cu);
                var (dg, du, hb, dcg, dcu) = LoraMlpKernels.Backward(dh.clone(), xd, ad, g.clone(), u.clone(), xg, bg, 0.25, xu, bu, 0.25, wantH,
                    cg, cu, gateScaleGrad: rowScales, upScaleGrad: rowScales);
                return new[] { h, dg, du, hb, dcg, dcu }.OfType<Tensor>().ToArray();
            }
            finally
            {
                (LoraMlpKernels.Variants, LoraMlpKernels.FastSigmoid, LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages) = before;
            }
        }
        var launches = LoraMlpKernels.VariantLaunches;
        var today = Run((null, null));
        Assert.Equal(launches, LoraMlpKernels.VariantLaunches);
        var variant = Run((LoraMlpKernelVariant.Parse(forward), LoraMlpKernelVariant.Parse(backward)));
        Assert.Null(LoraMlpKernels.VariantCompileFailure);
        Assert.Equal(launches + 2, LoraMlpKernels.VariantLaunches);
        Assert.Equal(today.Length, variant.Length);
        Assert.Equal((wantH ? 4 : 3) + (rowScales ? 2 : 0), today.Length);
        for (var i = 0; i < today.Length; i++)
            Assert.True(Exact.Equal(variant[i], today[i]), $"result {i} of {forward},{backward} differs from today's kernels'");
    }

    [Theory]
    // dtype, tokens, width, backward variant (with LM_DA), approximate sigmoid, DoRA's row scales, tokens per block (0: one wave)
    [InlineData(ScalarType.BFloat16, 150L, 136L, "s2v10b3", true, false, 64)]
    [InlineData(ScalarType.BFloat16, 300L, 520L, "s3v11b2", true, true, 128)]
    [InlineData(ScalarType.Float16, 77L, 264L, "s2v10b2", false, true, 32)]
    [InlineData(ScalarType.BFloat16, 2000L, 136L, "s2v11b3", false, false, 0)]
    [InlineData(ScalarType.BFloat16, 150L, 136L, "s2v9b2", true, false, 64)] // without LM_XS: transposed by movmatrix
    [InlineData(ScalarType.BFloat16, 300L, 520L, "s3v13b2@256", true, true, 128)]
    [InlineData(ScalarType.Float16, 77L, 264L, "s2v8b3", false, true, 32)]
    public void A_down_gradient_formed_in_the_kernel_matches_dxa_t_h(ScalarType dtype, long rows, long cols, string backward, bool fast,
        bool rowScales, int rowsPerBlock)
    {
        var variant = LoraMlpKernelVariant.Parse(backward)!.Value;
        Assert.True(variant.FormsDownAGrad);
        Assert.False(variant.WithoutDownAGrad.FormsDownAGrad);
        if (!TestDevice.IsCuda) return;
        using var scope = NewDisposeScope();
        var gen = new Generator(139);
        Tensor R(long[] shape, double scale = 1) => (randn(shape, ScalarType.Float32, generator: gen) * scale).to(dtype).to(Dev);
        var (g, u, dh) = (R([rows, cols]), R([rows, cols]), R([rows, cols]));
        var (xa, xd) = (R([rows, 32]), R([rows, 16], 0.5));
        var (bg, bu, ad) = (R([cols, 16]), R([cols, 16]), R([16, cols], 0.5));
        var (xg, xu) = (xa.narrow(1, 0, 16), xa.narrow(1, 16, 16));
        var (cg, cu) = rowScales ? (1 + 0.1 * randn([cols], generator: gen).to(Dev), 1 + 0.1 * randn([cols], generator: gen).to(Dev)) : (null, null);
        Assert.True(LoraMlpKernels.Applies("silu", g, u, 16, 16, 16));
        (Tensor dg, Tensor du, Tensor? h, Tensor? dcg, Tensor? dcu, Tensor? da) Run(LoraMlpKernelVariant? v, bool box)
        {
            var before = (LoraMlpKernels.Variants, LoraMlpKernels.FastSigmoid, LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages);
            (LoraMlpKernels.Variants, LoraMlpKernels.FastSigmoid) = ((null, v), fast);
            (LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages) = ((rowsPerBlock, rowsPerBlock), (2, 2));
            try
            {
                var da = box ? new System.Runtime.CompilerServices.StrongBox<Tensor?>() : null;
                var (dg, du, h, dcg, dcu) = LoraMlpKernels.Backward(dh.clone(), xd, ad, g.clone(), u.clone(), xg, bg, 0.25, xu, bu, 0.25, true,
                    cg, cu, rowScales, rowScales, downAGrad: da);
                return (dg, du, h, dcg, dcu, da?.Value);
            }
            finally
            {
                (LoraMlpKernels.Variants, LoraMlpKernels.FastSigmoid, LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages) = before;
            }
        }
        var (launches, formed) = (LoraMlpKernels.VariantLaunches, LoraMlpKernels.DownAGradLaunches);
        var today = Run(null, box: true);
        Assert.Null(today.da); // today's kernels write h
        Assert.NotNull(today.h);
        var fused = Run(variant, box: true);
        Assert.Null(LoraMlpKernels.VariantCompileFailure);
        Assert.Equal(launches + 1, LoraMlpKernels.VariantLaunches);
        Assert.Equal(formed + 1, LoraMlpKernels.DownAGradLaunches);
        Assert.Null(fused.h);
        Assert.NotNull(fused.da);
        Assert.True(Exact.Equal(fused.dg, today.dg) && Exact.Equal(fused.du, today.du), "dg, du differ from today's kernels'");
        // The scales' gradients: per-block sums, so the same bits where the variant keeps the tokens per block, else the
        // same sums grouped otherwise (fp32 rounding apart).
        if (rowScales && (variant.Rows == 0 || variant.Rows == rowsPerBlock))
            Assert.True(Exact.Equal(fused.dcg!, today.dcg!) && Exact.Equal(fused.dcu!, today.dcu!), "the scales' gradients differ");
        else if (rowScales)
        {
            FusedKernelTests.AssertClose(fused.dcg!, today.dcg!, 1e-4, 1e-4, "the gate scale's gradient");
            FusedKernelTests.AssertClose(fused.dcu!, today.dcu!, 1e-4, 1e-4, "the up scale's gradient");
        }
        // dxa_dᵀ·h in fp64 from today's h: the kernel's fp32 sums of exact products agree to fp32 rounding.
        var reference = xd.to(ScalarType.Float64).t().mm(today.h!.to(ScalarType.Float64));
        Assert.Equal(ScalarType.Float32, fused.da!.dtype);
        FusedKernelTests.AssertClose(fused.da.to(ScalarType.Float64).cpu(), reference.cpu(), 1e-4, 1e-3, "A_down's gradient");
        // Without the caller's box the variant runs without LM_DA and writes h (today's bits).
        var plain = Run(variant, box: false);
        Assert.Equal(launches + 2, LoraMlpKernels.VariantLaunches);
        Assert.True(Exact.Equal(plain.h!, today.h!), "h differs from today's kernels'");
    }

    [Theory]
    // dtype, tokens, width, forward variant (with LM_XA), approximate sigmoid, DoRA's row scales, tokens per block (0: one
    // wave); a width that is not a multiple of 256 takes the variant without LM_XA (h only)
    [InlineData(ScalarType.BFloat16, 150L, 512L, "s2v16b4", true, false, 64)]
    [InlineData(ScalarType.BFloat16, 300L, 256L, "s3v17b3", true, true, 128)]
    [InlineData(ScalarType.Float16, 77L, 768L, "s2v18b3", false, false, 32)]
    [InlineData(ScalarType.BFloat16, 2000L, 256L, "s2v20b3", false, true, 0)]
    [InlineData(ScalarType.BFloat16, 100L, 264L, "s2v17b3", true, false, 64)]
    public void Down_thin_product_formed_in_the_forward_kernel_matches_h_a_t(ScalarType dtype, long rows, long cols, string forward, bool fast,
        bool rowScales, int rowsPerBlock)
    {
        var variant = LoraMlpKernelVariant.Parse(forward)!.Value;
        Assert.True(variant.FormsDownXa);
        Assert.False(variant.WithoutDownXa.FormsDownXa);
        if (!TestDevice.IsCuda) return;
        using var scope = NewDisposeScope();
        var gen = new Generator(149);
        Tensor R(long[] shape, double scale = 1) => (randn(shape, ScalarType.Float32, generator: gen) * scale).to(dtype).to(Dev);
        var (g, u, xa) = (R([rows, cols]), R([rows, cols]), R([rows, 32]));
        var (bg, bu, ad) = (R([cols, 16]), R([cols, 16]), R([16, cols], 0.5));
        var (xg, xu) = (xa.narrow(1, 0, 16), xa.narrow(1, 16, 16));
        var (cg, cu) = rowScales ? (1 + 0.1 * randn([cols], generator: gen).to(Dev), 1 + 0.1 * randn([cols], generator: gen).to(Dev)) : (null, null);
        Assert.True(LoraMlpKernels.Applies("silu", g, u, 16, 16, 16));
        (Tensor h, Tensor? xad) Run(LoraMlpKernelVariant? v)
        {
            var before = (LoraMlpKernels.Variants, LoraMlpKernels.FastSigmoid, LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages);
            (LoraMlpKernels.Variants, LoraMlpKernels.FastSigmoid) = ((v, null), fast);
            (LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages) = ((rowsPerBlock, rowsPerBlock), (2, 2));
            try
            {
                var box = new System.Runtime.CompilerServices.StrongBox<Tensor?>();
                var h = LoraMlpKernels.Forward(g, u, xg, bg, 0.25, xu, bu, 0.25, cg, cu, downA: ad, downXa: box);
                return (h, box.Value);
            }
            finally
            {
                (LoraMlpKernels.Variants, LoraMlpKernels.FastSigmoid, LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages) = before;
            }
        }
        var (launches, formed) = (LoraMlpKernels.VariantLaunches, LoraMlpKernels.DownXaLaunches);
        var today = Run(null);
        Assert.Null(today.xad);
        var fused = Run(variant);
        Assert.Null(LoraMlpKernels.VariantCompileFailure);
        Assert.Equal(launches + 1, LoraMlpKernels.VariantLaunches);
        Assert.True(Exact.Equal(fused.h, today.h), "h differs from today's kernels'");
        Assert.Equal(formed + (cols % 256 == 0 ? 1 : 0), LoraMlpKernels.DownXaLaunches);
        if (cols % 256 != 0)
        {
            Assert.Null(fused.xad);
            return;
        }
        // h·A_dᵀ in fp64 from h, rounded to the dtype: the kernel's fp32 sums, rounded once, are within one rounding of it.
        var reference = today.h.to(ScalarType.Float64).mm(ad.to(ScalarType.Float64).t());
        Assert.Equal(dtype, fused.xad!.dtype);
        Assert.Equal(new[] { rows, 16L }, fused.xad.shape);
        FusedKernelTests.AssertClose(fused.xad.to(ScalarType.Float64).cpu(), reference.cpu(), 8e-3, 1e-3, "h·A_dᵀ");
    }

    [Theory]
    // forward and backward variant (A_down's gradient and down's thin product in the kernels), DoRA's row scales
    [InlineData("s2v17b4", "s2v11b3", false)]
    [InlineData("s3v19b3", "s3v10b2", true)]
    [InlineData("s2v17b4", "s2v9b2@256", false)]
    public void Mlp_with_variants_matches_the_composite_path(string forward, string backward, bool rowScales) =>
        FusedMlpMatchesTheComposite((LoraMlpKernelVariant.Parse(forward), LoraMlpKernelVariant.Parse(backward)), rowScales);

    [Theory]
    // LoRA (Variants) and DoRA (RowScaleVariants): the pairs the MLP takes by default.
    [InlineData(false)]
    [InlineData(true)]
    public void The_default_variants_run_the_fused_mlp_and_match_the_composite_path(bool dora)
    {
        var pair = dora ? LoraMlpKernels.DefaultRowScaleVariantPair : LoraMlpKernels.DefaultVariantPair;
        Assert.NotNull(pair.Forward);
        Assert.NotNull(pair.Backward);
        FusedMlpMatchesTheComposite(pair, dora);
    }

    // The default kernels were tuned at their register caps (the blocks per multiprocessor a variant is built for): a
    // change that makes the compiler spill passes every bit test and only shows as time, so the spill is checked here.
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void The_default_variant_kernels_keep_to_registers(bool dora)
    {
        if (!TestDevice.IsCuda) return;
        using var g = zeros([16, 16], ScalarType.BFloat16, Dev);
        Assert.True(LoraMlpKernels.Applies("silu", g, g, 16, 16, 16)); // loads NVRTC as the MLP does
        var pair = dora ? LoraMlpKernels.DefaultRowScaleVariantPair : LoraMlpKernels.DefaultVariantPair;
        foreach (var (op, v) in new[] { ("fwd", pair.Forward!.Value), ("bwd", pair.Backward!.Value) })
        {
            var f = LoraMlpKernels.VariantKernel(0, op, v, ScalarType.BFloat16, dora);
            Assert.True(f is not null, $"{op} {v}: {LoraMlpKernels.VariantCompileFailure}");
            Assert.InRange(f.Registers, 1, 65536 / (256 * v.Blocks));
            Assert.True(f.LocalBytes == 0, $"{f.Name}: {f.LocalBytes} B of local memory a thread at {f.Registers} registers");
        }
    }

    // The fused MLP (LoRA r16 on gate, up, down; DoRA's row scales on gate and up) with these variants against the
    // composite ops; on CUDA both kernels must be the variants, with down's thin products in them where their flags say.
    private static void FusedMlpMatchesTheComposite((LoraMlpKernelVariant? Forward, LoraMlpKernelVariant? Backward) pair, bool rowScales)
    {
        var gen = new Generator(151);
        const long hidden = 32, inter = 512;
        var dtype = ScalarType.BFloat16;
        using var gate = new LowRank(hidden, inter, 16, dtype, gen, rowScales);
        using var up = new LowRank(hidden, inter, 16, dtype, gen, rowScales);
        using var down = new LowRank(inter, hidden, 16, dtype, gen);
        var trainable = gate.Trainable().Concat(up.Trainable()).Concat(down.Trainable()).ToList();
        var block = new FixtureBlock();
        var x0 = randn([2, 45, hidden], generator: gen).to(dtype).to(Dev);
        var dy = randn([2, 45, hidden], generator: gen).to(dtype).to(Dev);
        (Tensor y, Tensor dx, Tensor[] grads) Run(Func<Tensor, Tensor> f)
        {
            foreach (var p in trainable) p.grad = null;
            var x = x0.detach().clone().requires_grad_(true);
            var y = f(x);
            (y.to(ScalarType.Float32) * dy.to(ScalarType.Float32)).sum().backward();
            return (y.detach(), x.grad!.detach().clone(), trainable.Select(p => p.grad!.detach().clone()).ToArray());
        }
        var (launches, xaFormed, daFormed) = (LoraMlpKernels.VariantLaunches, LoraMlpKernels.DownXaLaunches, LoraMlpKernels.DownAGradLaunches);
        var before = (LoraMlpKernels.Variants, LoraMlpKernels.RowScaleVariants);
        (LoraMlpKernels.Variants, LoraMlpKernels.RowScaleVariants) = (pair, null);
        (Tensor y, Tensor dx, Tensor[] grads) fused;
        try
        {
            fused = Run(x => LoraFusion.TryMlp(block, "silu", gate, up, down, x, fused: true)
                ?? throw new Xunit.Sdk.XunitException($"not fused: {LoraFusionPaths.Of(block)}"));
        }
        finally
        {
            (LoraMlpKernels.Variants, LoraMlpKernels.RowScaleVariants) = before;
        }
        Assert.Equal(launches + (TestDevice.IsCuda ? 2 : 0), LoraMlpKernels.VariantLaunches);
        // The in-kernel products taken by the MLP where the variants form them (LoraMlpFunction asks for both).
        var cuda = TestDevice.IsCuda ? 1 : 0;
        var (xa, da) = (pair.Forward is { FormsDownXa: true } ? cuda : 0, pair.Backward is { FormsDownAGrad: true } ? cuda : 0);
        Assert.Equal((xaFormed + xa, daFormed + da), (LoraMlpKernels.DownXaLaunches, LoraMlpKernels.DownAGradLaunches));
        Assert.Null(LoraMlpKernels.VariantCompileFailure);
        var composite = Run(x => { using var scope = NewDisposeScope(); return down.call(torchx.nn.functional.swiglu(gate.call(x), up.call(x))).MoveToOuterDisposeScope(); });
        FusedKernelTests.AssertClose(fused.y, composite.y, 3e-2, 3e-2, "output");
        FusedKernelTests.AssertClose(fused.dx, composite.dx, 3e-2, 3e-2, "dx");
        for (var i = 0; i < trainable.Count; i++)
        {
            Assert.Equal(trainable[i].dtype, fused.grads[i].dtype);
            FusedKernelTests.AssertClose(fused.grads[i], composite.grads[i], 3e-2, 3e-2, $"gradient of trainable tensor {i}");
        }
    }

    [Fact]
    public void Variants_are_taken_only_where_every_term_has_rank_16_and_fits()
    {
        if (!TestDevice.IsCuda) return;
        using var scope = NewDisposeScope();
        var gen = new Generator(137);
        Tensor R(long[] shape) => randn(shape, ScalarType.Float32, generator: gen).to(ScalarType.BFloat16).to(Dev);
        var (g, u) = (R([100, 136]), R([100, 136]));
        Assert.True(LoraMlpKernels.Applies("silu", g, u, 16, 16, 16));
        var before = LoraMlpKernels.Variants;
        LoraMlpKernels.Variants = (LoraMlpKernelVariant.Parse("s3v2b4"), LoraMlpKernelVariant.Parse("s3v2b3"));
        try
        {
            var launches = LoraMlpKernels.VariantLaunches;
            // Rank 32 in gate: today's kernels.
            var xa = R([100, 48]);
            LoraMlpKernels.Forward(g, u, xa.narrow(1, 0, 32), R([136, 32]), 0.5, xa.narrow(1, 32, 16), R([136, 16]), 0.5);
            Assert.Equal(launches, LoraMlpKernels.VariantLaunches);
            // No up update: today's kernels.
            LoraMlpKernels.Forward(g, u, xa.narrow(1, 0, 16), R([136, 16]), 0.5, null, null, 0);
            Assert.Equal(launches, LoraMlpKernels.VariantLaunches);
            // Thin rows of 36 elements (72 bytes: not 16-byte pieces) where the variant copies them: today's kernels.
            var odd = R([100, 36]);
            LoraMlpKernels.Forward(g, u, odd.narrow(1, 0, 16), R([136, 16]), 0.5, odd.narrow(1, 16, 16), R([136, 16]), 0.5);
            Assert.Equal(launches, LoraMlpKernels.VariantLaunches);
            // The same without copying the thin rows: the variant.
            LoraMlpKernels.Variants = (LoraMlpKernelVariant.Parse("s3v1b4"), null);
            LoraMlpKernels.Forward(g, u, odd.narrow(1, 0, 16), R([136, 16]), 0.5, odd.narrow(1, 16, 16), R([136, 16]), 0.5);
            Assert.Equal(launches + 1, LoraMlpKernels.VariantLaunches);
            Assert.Contains("variants s3v1b4,-", LoraMlpKernels.Report);
            // DoRA's own variants (none here): the row-scale kernels take today's, the plain ones still the variant.
            LoraMlpKernels.RowScaleVariants = (null, null);
            var c = ones([136], ScalarType.Float32, Dev);
            LoraMlpKernels.Forward(g, u, odd.narrow(1, 0, 16), R([136, 16]), 0.5, odd.narrow(1, 16, 16), R([136, 16]), 0.5, c, c);
            Assert.Equal(launches + 1, LoraMlpKernels.VariantLaunches);
            LoraMlpKernels.Forward(g, u, odd.narrow(1, 0, 16), R([136, 16]), 0.5, odd.narrow(1, 16, 16), R([136, 16]), 0.5);
            Assert.Equal(launches + 2, LoraMlpKernels.VariantLaunches);
            Assert.Contains("(DoRA -,-)", LoraMlpKernels.Report);
        }
        finally
        {
            (LoraMlpKernels.Variants, LoraMlpKernels.RowScaleVariants) = (before, null);
        }
    }

    // LORAHUB_LORA_MLP_VARIANT_BENCH=FILE: microseconds per launch at llama-1b's MLP (8192 tokens × 8192, bf16, ranks 16;
    // backward with h) for today's pipelined kernels and each variant of LORAHUB_LORA_MLP_VARIANT_BENCH_FWD / _BWD (space-
    // separated "s3v1b4" or "s3v1b4@256": 256 tokens per block, 0 one wave), LoRA and DoRA (row scales), with the
    // approximate sigmoid (the default), appended to FILE as "variant-bench ..." lines with the DRAM rate the kernel's bytes
    // make (forward reads g, u, writes h: 3 × 128 MiB; backward reads dh, g, u, writes dg, du, h: 6 × 128 MiB, 5 where the
    // kernel forms A_d's gradient instead of writing h; the backward's "lora"/"dora" times include forming that gradient:
    // the GEMM dxa_dᵀ·h after today's kernels, the per-block parts' sum after LM_DA's), and torch's
    // own add (reads 2, writes 1: the forward's bytes) and copy (reads 1, writes 1) for the rate elementwise kernels reach.
    // Host stopwatch over 30 launches queued back to back (LORAHUB_LORA_MLP_BENCH_ITERATIONS); each backward launch after
    // a copy of the original inputs into place, the copies' time subtracted. Lines are appended as measured. Not a speed
    // assertion.
    [Fact]
    public void Variant_kernels_timed_when_asked()
    {
        var file = Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_VARIANT_BENCH");
        if (!TestDevice.IsCuda || string.IsNullOrEmpty(file)) return;
        using var scope = NewDisposeScope();
        const long rows = 8192, cols = 8192;
        var iterations = int.TryParse(Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_BENCH_ITERATIONS"), out var n) && n > 0 ? n : 30;
        var gen = new Generator(89);
        Tensor R(long[] shape, double scale = 1) => (randn(shape, ScalarType.Float32, generator: gen) * scale).to(ScalarType.BFloat16).to(Dev);
        var (g0, u0, dh0) = (R([rows, cols]), R([rows, cols]), R([rows, cols]));
        var (g, u, dh) = (g0.clone(), u0.clone(), dh0.clone());
        var (xa, xd) = (R([rows, 32]), R([rows, 16], 0.5));
        var (bg, bu, ad) = (R([cols, 16]), R([cols, 16]), R([16, cols], 0.1));
        var (xg, xu) = (xa.narrow(1, 0, 16), xa.narrow(1, 16, 16));
        var (cg, cu) = (1 + 0.1 * randn([cols], generator: gen).to(Dev), 1 + 0.1 * randn([cols], generator: gen).to(Dev));
        Assert.True(LoraMlpKernels.Applies("silu", g, u, 16, 16, 16));
        double Time(Action launch) => KernelTimer.Microseconds(launch, iterations);
        void Restore()
        {
            g.copy_(g0);
            u.copy_(u0);
            dh.copy_(dh0);
        }
        var restore = Time(Restore);
        const double mib128 = rows * cols * 2;
        string Rate(double us, int tensors) => $"us={us:F1} TB/s={tensors * mib128 / us / 1e6:F2}";
        // Each line as it is measured (a run cut short keeps what it has).
        void Line(string text) => File.AppendAllLines(file, [text]);
        Line($"variant-bench restore (3 copies, subtracted from backward) us={restore:F1}");
        Line($"variant-bench ref torch add (2 reads, 1 write) {Rate(Time(() => g.add(u)), 3)}");
        Line($"variant-bench ref torch copy (1 read, 1 write) {Rate(Time(() => dh.copy_(g)), 2)}");
        Restore();
        string[] List(string name, string fallback) =>
            (Environment.GetEnvironmentVariable(name) is { Length: > 0 } s ? s : fallback).Split(' ', StringSplitOptions.RemoveEmptyEntries);
        var before = (LoraMlpKernels.Variants, LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages, LoraMlpKernels.FastSigmoid);
        try
        {
            (LoraMlpKernels.Stages, LoraMlpKernels.FastSigmoid) = ((2, 2), true);
            foreach (var op in new[] { "fwd", "bwd" })
            {
                var fallback = op == "fwd" ? "today s2v1b4 s3v1b4 s2v3b4 s3v5b3" : "today s2v1b3 s3v1b3 s2v3b3 s3v5b2";
                foreach (var entry in List(op == "fwd" ? "LORAHUB_LORA_MLP_VARIANT_BENCH_FWD" : "LORAHUB_LORA_MLP_VARIANT_BENCH_BWD", fallback))
                {
                    var parts = entry.Split('@');
                    var blockRows = parts.Length > 1 && int.TryParse(parts[1], out var br) ? br : op == "fwd" ? 128 : 64;
                    var variant = LoraMlpKernelVariant.Parse(parts[0]);
                    if (variant is null && parts[0] != "today") continue;
                    LoraMlpKernels.Variants = op == "fwd" ? (variant, null) : (null, variant);
                    LoraMlpKernels.RowsPerBlock = (blockRows, blockRows);
                    var launches = LoraMlpKernels.VariantLaunches;
                    var taken = () => variant is null || LoraMlpKernels.VariantLaunches > launches ? "" : $" NOT TAKEN ({LoraMlpKernels.VariantCompileFailure})";
                    if (op == "fwd")
                    {
                        // Forward with down's thin product formed as the MLP forms it: h·A_dᵀ by GEMM from the h written, or
                        // by the kernel (LM_XA, then the sum of its per-block parts); "kernel" without it.
                        double Forward(bool scaled, bool withXa) => Time(() =>
                        {
                            var box = new System.Runtime.CompilerServices.StrongBox<Tensor?>();
                            var h = LoraMlpKernels.Forward(g, u, xg, bg, 0.25, xu, bu, 0.25, scaled ? cg : null, scaled ? cu : null, ad, box);
                            if (withXa && box.Value is null) h.mm(ad.t());
                        });
                        var kernelOnly = Forward(false, false);
                        Line($"variant-bench fwd {parts[0]} rows={blockRows} lora us={Forward(false, true):F1} TB/s=- dora us={Forward(true, true):F1} | "
                             + $"kernel {Rate(kernelOnly, 3)}{(variant is { FormsDownXa: true } ? " (h·A_dᵀ in it)" : "")}{taken()}");
                        continue;
                    }
                    // Backward with A_d's gradient formed as the MLP forms it: dxa_dᵀ·h by GEMM from the h written, or by the
                    // kernel (LM_DA, then the sum of its per-block parts); "kernel" without that GEMM.
                    double Backward(bool scaled, bool withGrad) => Time(() =>
                    {
                        Restore();
                        var box = new System.Runtime.CompilerServices.StrongBox<Tensor?>();
                        var (_, _, h, _, _) = LoraMlpKernels.Backward(dh, xd, ad, g, u, xg, bg, 0.25, xu, bu, 0.25, true, scaled ? cg : null,
                            scaled ? cu : null, scaled, scaled, downAGrad: box);
                        if (withGrad && box.Value is null) xd.t().mm(h!);
                    }) - restore;
                    var kernel = Backward(false, false);
                    var formed = variant is { FormsDownAGrad: true };
                    Line($"variant-bench bwd {parts[0]} rows={blockRows} lora us={Backward(false, true):F1} TB/s=- dora us={Backward(true, true):F1} | "
                         + $"kernel {Rate(kernel, formed ? 5 : 6)}{(formed ? " (A_d's gradient in it)" : "")}{taken()}");
                }
            }
        }
        finally
        {
            (LoraMlpKernels.Variants, LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages, LoraMlpKernels.FastSigmoid) = before;
        }
        Restore();
    }
}
