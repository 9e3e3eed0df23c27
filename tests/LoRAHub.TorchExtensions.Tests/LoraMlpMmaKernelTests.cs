using LoRAHub.TorchExtensions.Modules;
using TorchSharp.Modules;
using Block = LoRAHub.TorchExtensions.Tests.FixtureBlock;
using LowRank = LoRAHub.TorchExtensions.Tests.LowRankFixture;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The fused LoRA MLP with its low-rank updates formed inside the SwiGLU kernels on tensor cores
/// (<see cref="LoraMlpKernels"/>): the forward output and the gradients of x and of every A and B against the composite ops
/// (LoRA's layers: base GEMM, then addmm of the update; SwiGLU; down), bf16 and fp16, ranks 16..64 and none, token counts
/// that are not a multiple of the 16-token tile, widths that are not a multiple of the 32-column strip; and the kernels
/// themselves against an fp64 reference rounded where they round; the pipelined (cp.async) kernels against the register
/// kernels bit for bit; DoRA's gate/up row scales in the kernels (c, and c = m/n) and the approximate sigmoid against the
/// composite path. On CUDA (LORAHUB_TEST_DEVICE=cuda) the kernels must run where they apply (forward and backward
/// launches counted: a silent fallback fails) and must not where they do not (fp32, a rank that is not a multiple of 16,
/// a width that is not a multiple of 8); elsewhere they never apply and the fused block still matches (the addmm path).
/// </summary>
[Collection(KernelTestsCollection.Name)] // toggles LoraMlpKernels.Enabled / RowsPerBlock and counts its launches (process-wide)
public class LoraMlpMmaKernelTests
{
    private static readonly Device Dev = TestDevice.Current;
    private const long Hidden = 32;

    [Theory]
    // dtype, ranks of gate, up, down, intermediate width, tokens per sequence (2 sequences), tokens per block, tiles per step
    // (forward and backward; 0: the default), kernels expected on CUDA, stages of the pipelined kernels (0: the register kernels)
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 136, 37, 64, 0, true, 0)]
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 136, 37, 32, 1, true, 0)]
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 264, 70, 16, 2, true, 0)]
    [InlineData(ScalarType.BFloat16, 32, 16, 0, 264, 70, 16, 0, true, 0)]
    [InlineData(ScalarType.BFloat16, 0, 48, 64, 512, 5, 64, 0, true, 0)]
    [InlineData(ScalarType.BFloat16, 16, 0, 16, 200, 37, 32, 2, true, 0)]
    [InlineData(ScalarType.BFloat16, 64, 64, 32, 72, 41, 48, 0, true, 0)]
    [InlineData(ScalarType.Float16, 16, 16, 16, 136, 37, 64, 0, true, 0)]
    [InlineData(ScalarType.Float16, 16, 16, 16, 136, 37, 16, 2, true, 0)]
    [InlineData(ScalarType.Float16, 32, 32, 16, 264, 9, 16, 0, true, 0)]
    // The pipelined kernels (cp.async stages): ranks 16 (one k-step), 32 (two), 48 and 64 (four), partial tiles and strips.
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 136, 37, 64, 0, true, 2)]
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 264, 70, 16, 0, true, 3)]
    [InlineData(ScalarType.BFloat16, 32, 16, 0, 264, 70, 32, 0, true, 3)]
    [InlineData(ScalarType.BFloat16, 0, 48, 64, 512, 5, 64, 0, true, 2)]
    [InlineData(ScalarType.BFloat16, 64, 64, 32, 72, 41, 48, 0, true, 3)]
    [InlineData(ScalarType.Float16, 16, 16, 16, 136, 37, 64, 0, true, 3)]
    [InlineData(ScalarType.Float16, 32, 32, 16, 264, 9, 16, 0, true, 2)]
    // Not taken (the addmm path, still matching): a rank not a multiple of 16, fp32, a width not a multiple of 8.
    [InlineData(ScalarType.BFloat16, 8, 16, 16, 136, 37, 64, 0, false, 0)]
    [InlineData(ScalarType.Float32, 16, 16, 16, 136, 37, 64, 0, false, 0)]
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 130, 9, 64, 0, false, 0)]
    public void Mlp_with_updates_in_the_kernels_matches_the_composite_path(ScalarType dtype, int rankGate, int rankUp, int rankDown,
        long inter, long tokens, int rowsPerBlock, int perStep, bool kernel, int stages)
    {
        var gen = new Generator((ulong)(61 + rankGate + rankUp + inter));
        using var gate = new LowRank(Hidden, inter, rankGate, dtype, gen);
        using var up = new LowRank(Hidden, inter, rankUp, dtype, gen);
        using var down = new LowRank(inter, Hidden, rankDown, dtype, gen);
        var trainable = gate.Trainable().Concat(up.Trainable()).Concat(down.Trainable()).ToList();
        var block = new Block();
        var x0 = randn([2, tokens, Hidden], generator: gen).to(dtype).to(Dev);
        var dy = randn([2, tokens, Hidden], generator: gen).to(dtype).to(Dev);
        kernel = kernel && TestDevice.IsCuda;
        var (fwd, bwd, pipe) = (LoraMlpKernels.ForwardLaunches, LoraMlpKernels.BackwardLaunches, LoraMlpKernels.PipelinedLaunches);

        (Tensor y, Tensor dx, Tensor[] grads) Run(Func<Tensor, Tensor> f)
        {
            foreach (var p in trainable) p.grad = null;
            var x = x0.detach().clone().requires_grad_(true);
            var y = f(x);
            (y.to(ScalarType.Float32) * dy.to(ScalarType.Float32)).sum().backward();
            return (y.detach(), x.grad!.detach().clone(), trainable.Select(p => p.grad!.detach().clone()).ToArray());
        }

        var (rows, tiles, stagesBefore) = (LoraMlpKernels.RowsPerBlock, LoraMlpKernels.TilesInFlight, LoraMlpKernels.Stages);
        LoraMlpKernels.RowsPerBlock = (rowsPerBlock, rowsPerBlock);
        if (perStep > 0) LoraMlpKernels.TilesInFlight = (perStep, perStep);
        LoraMlpKernels.Stages = (stages, stages);
        (Tensor y, Tensor dx, Tensor[] grads) fused;
        try
        {
            fused = Run(x => LoraFusion.TryMlp(block, "silu", gate, up, down, x, fused: true)
                ?? throw new Xunit.Sdk.XunitException($"not fused: {LoraFusionPaths.Of(block)}"));
        }
        finally
        {
            (LoraMlpKernels.RowsPerBlock, LoraMlpKernels.TilesInFlight, LoraMlpKernels.Stages) = (rows, tiles, stagesBefore);
        }
        Assert.Null(LoraMlpKernels.CompileFailure);
        Assert.Equal(fwd + (kernel ? 1 : 0), LoraMlpKernels.ForwardLaunches);
        Assert.Equal(bwd + (kernel ? 1 : 0), LoraMlpKernels.BackwardLaunches);
        if (kernel && stages > 0) Assert.Null(LoraMlpKernels.PipelinedCompileFailure);
        Assert.Equal(pipe + (kernel && stages > 0 ? 2 : 0), LoraMlpKernels.PipelinedLaunches);
        var composite = Run(x => { using var scope = NewDisposeScope(); return CompositeMlp(gate, up, down, x).MoveToOuterDisposeScope(); });

        var (rtol, atol) = dtype == ScalarType.Float32 ? (2e-5, 2e-5) : (3e-2, 3e-2);
        FusedKernelTests.AssertClose(fused.y, composite.y, rtol, atol, "output");
        FusedKernelTests.AssertClose(fused.dx, composite.dx, rtol, atol, "dx");
        Assert.Equal(trainable.Count, fused.grads.Length);
        for (var i = 0; i < trainable.Count; i++)
        {
            Assert.Equal(trainable[i].dtype, fused.grads[i].dtype);
            FusedKernelTests.AssertClose(fused.grads[i], composite.grads[i], rtol, atol, $"gradient of trainable tensor {i}");
        }
    }

    [Theory]
    // dtype, ranks of gate, up, down, intermediate width, tokens per sequence (2 sequences), tokens per block, stages (0:
    // the defaults for row scales, 3 and 2), row scales on gate, up, down, scales as m/n (DividedRowScale)
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 136, 37, 64, 0, true, true, false, false)]
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 264, 70, 16, 3, true, true, true, false)]
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 264, 70, 64, 0, true, true, true, true)]
    [InlineData(ScalarType.BFloat16, 32, 16, 0, 264, 70, 32, 3, true, false, false, false)]
    [InlineData(ScalarType.BFloat16, 16, 48, 64, 512, 5, 64, 2, false, true, true, true)]
    [InlineData(ScalarType.BFloat16, 64, 64, 32, 72, 41, 48, 2, true, true, false, false)]
    [InlineData(ScalarType.Float16, 16, 16, 16, 136, 37, 16, 3, true, true, false, false)]
    public void Dora_mlp_with_row_scales_in_the_kernels_matches_the_composite_path(ScalarType dtype, int rankGate, int rankUp,
        int rankDown, long inter, long tokens, int rowsPerBlock, int stages, bool scaleGate, bool scaleUp, bool scaleDown, bool divided)
    {
        var gen = new Generator((ulong)(97 + rankGate + rankUp + inter));
        using var gate = new LowRank(Hidden, inter, rankGate, dtype, gen, scaleGate, divided);
        using var up = new LowRank(Hidden, inter, rankUp, dtype, gen, scaleUp, divided);
        using var down = new LowRank(inter, Hidden, rankDown, dtype, gen, scaleDown, divided);
        var trainable = gate.Trainable().Concat(up.Trainable()).Concat(down.Trainable()).ToList();
        var block = new Block();
        var x0 = randn([2, tokens, Hidden], generator: gen).to(dtype).to(Dev);
        var dy = randn([2, tokens, Hidden], generator: gen).to(dtype).to(Dev);
        var kernel = TestDevice.IsCuda;

        (Tensor y, Tensor dx, Tensor[] grads) Run(Func<Tensor, Tensor> f)
        {
            foreach (var p in trainable) p.grad = null;
            var x = x0.detach().clone().requires_grad_(true);
            var y = f(x);
            (y.to(ScalarType.Float32) * dy.to(ScalarType.Float32)).sum().backward();
            return (y.detach(), x.grad!.detach().clone(), trainable.Select(p => p.grad!.detach().clone()).ToArray());
        }
        (Tensor y, Tensor dx, Tensor[] grads) Fused(bool inKernels)
        {
            var before = (LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages, LoraMlpKernels.RowScalesEnabled);
            LoraMlpKernels.RowsPerBlock = (rowsPerBlock, rowsPerBlock);
            LoraMlpKernels.Stages = (stages, stages);
            LoraMlpKernels.RowScalesEnabled = inKernels;
            try
            {
                return Run(x => LoraFusion.TryMlp(block, "silu", gate, up, down, x, fused: true)
                    ?? throw new Xunit.Sdk.XunitException($"not fused: {LoraFusionPaths.Of(block)}"));
            }
            finally
            {
                (LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages, LoraMlpKernels.RowScalesEnabled) = before;
            }
        }

        var (fwd, bwd, pipe) = (LoraMlpKernels.ForwardLaunches, LoraMlpKernels.BackwardLaunches, LoraMlpKernels.PipelinedLaunches);
        var off = Fused(inKernels: false); // the scaled SwiGLU kernels (or tensor ops) with the addmm passes
        Assert.Equal((fwd, bwd), (LoraMlpKernels.ForwardLaunches, LoraMlpKernels.BackwardLaunches));
        var fused = Fused(inKernels: true);
        Assert.Null(LoraMlpKernels.CompileFailure);
        Assert.Null(LoraMlpKernels.PipelinedCompileFailure);
        Assert.Equal(fwd + (kernel ? 1 : 0), LoraMlpKernels.ForwardLaunches);
        Assert.Equal(bwd + (kernel ? 1 : 0), LoraMlpKernels.BackwardLaunches);
        Assert.Equal(pipe + (kernel ? 2 : 0), LoraMlpKernels.PipelinedLaunches);
        var composite = Run(x => { using var scope = NewDisposeScope(); return CompositeMlp(gate, up, down, x).MoveToOuterDisposeScope(); });

        var (rtol, atol) = (3e-2, 3e-2);
        foreach (var (other, name) in new[] { (composite, "composite"), (off, "scaled path") })
        {
            FusedKernelTests.AssertClose(fused.y, other.y, rtol, atol, $"output vs the {name}");
            FusedKernelTests.AssertClose(fused.dx, other.dx, rtol, atol, $"dx vs the {name}");
            Assert.Equal(trainable.Count, fused.grads.Length);
            for (var i = 0; i < trainable.Count; i++)
            {
                Assert.Equal(trainable[i].dtype, fused.grads[i].dtype);
                FusedKernelTests.AssertClose(fused.grads[i], other.grads[i], rtol, atol, $"gradient of trainable tensor {i} vs the {name}");
            }
        }
    }

    [Theory]
    // dtype, ranks of gate, up, down, intermediate width, tokens per sequence (2 sequences), row scales on gate and up
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 264, 70, false)]
    [InlineData(ScalarType.BFloat16, 16, 0, 16, 136, 37, true)]
    [InlineData(ScalarType.Float16, 16, 16, 16, 136, 37, true)]
    public void Fast_sigmoid_kernels_match_the_composite_path(ScalarType dtype, int rankGate, int rankUp, int rankDown, long inter,
        long tokens, bool rowScales)
    {
        var gen = new Generator((ulong)(101 + rankUp + inter));
        using var gate = new LowRank(Hidden, inter, rankGate, dtype, gen, rowScales);
        using var up = new LowRank(Hidden, inter, rankUp, dtype, gen, rowScales && rankUp > 0);
        using var down = new LowRank(inter, Hidden, rankDown, dtype, gen);
        var trainable = gate.Trainable().Concat(up.Trainable()).Concat(down.Trainable()).ToList();
        var block = new Block();
        var x0 = randn([2, tokens, Hidden], generator: gen).to(dtype).to(Dev);
        var dy = randn([2, tokens, Hidden], generator: gen).to(dtype).to(Dev);
        (Tensor y, Tensor dx, Tensor[] grads) Run(Func<Tensor, Tensor> f)
        {
            foreach (var p in trainable) p.grad = null;
            var x = x0.detach().clone().requires_grad_(true);
            var y = f(x);
            (y.to(ScalarType.Float32) * dy.to(ScalarType.Float32)).sum().backward();
            return (y.detach(), x.grad!.detach().clone(), trainable.Select(p => p.grad!.detach().clone()).ToArray());
        }
        var before = (LoraMlpKernels.Stages, LoraMlpKernels.FastSigmoid, LoraMlpKernels.RowScalesEnabled);
        var pipe = LoraMlpKernels.PipelinedLaunches;
        (Tensor y, Tensor dx, Tensor[] grads) fused;
        (LoraMlpKernels.Stages, LoraMlpKernels.FastSigmoid, LoraMlpKernels.RowScalesEnabled) = ((2, 2), true, true);
        try
        {
            Assert.Contains("fast sigmoid", LoraMlpKernels.Report);
            fused = Run(x => LoraFusion.TryMlp(block, "silu", gate, up, down, x, fused: true)
                ?? throw new Xunit.Sdk.XunitException($"not fused: {LoraFusionPaths.Of(block)}"));
        }
        finally
        {
            (LoraMlpKernels.Stages, LoraMlpKernels.FastSigmoid, LoraMlpKernels.RowScalesEnabled) = before;
        }
        Assert.Null(LoraMlpKernels.PipelinedCompileFailure);
        Assert.Equal(pipe + (TestDevice.IsCuda ? 2 : 0), LoraMlpKernels.PipelinedLaunches);
        var composite = Run(x => { using var scope = NewDisposeScope(); return CompositeMlp(gate, up, down, x).MoveToOuterDisposeScope(); });
        FusedKernelTests.AssertClose(fused.y, composite.y, 3e-2, 3e-2, "output");
        FusedKernelTests.AssertClose(fused.dx, composite.dx, 3e-2, 3e-2, "dx");
        for (var i = 0; i < trainable.Count; i++)
            FusedKernelTests.AssertClose(fused.grads[i], composite.grads[i], 3e-2, 3e-2, $"gradient of trainable tensor {i}");
    }

    private static Tensor CompositeMlp(LowRank gate, LowRank up, LowRank down, Tensor x) =>
        down.call(torchx.nn.functional.swiglu(gate.call(x), up.call(x)));

    [Theory]
    // dtype, tokens, width, ranks of gate, up, down, h wanted
    [InlineData(ScalarType.BFloat16, 150L, 136L, 32, 16, 48, true)]
    [InlineData(ScalarType.BFloat16, 37L, 520L, 16, 16, 16, false)]
    [InlineData(ScalarType.Float16, 150L, 264L, 16, 64, 16, true)]
    public void The_kernels_give_the_reference_rounded_where_the_addmm_path_rounds(ScalarType dtype, long rows, long cols, int rg, int ru, int rd, bool wantH)
    {
        if (!TestDevice.IsCuda)
        {
            using var z = zeros([16, 16], dtype);
            Assert.False(LoraMlpKernels.Applies("silu", z, z, 16, 16, 16));
            return;
        }
        var gen = new Generator(71);
        Tensor R(long[] shape, double scale = 1) => (randn(shape, ScalarType.Float64, generator: gen) * scale).to(dtype);
        var (g, u, dh) = (R([rows, cols]), R([rows, cols]), R([rows, cols]));
        var (xa, xd) = (R([rows, rg + ru]), R([rows, rd], 0.5));
        var (bg, bu, ad) = (R([cols, rg]), R([cols, ru]), R([rd, cols], 0.5));
        double sg = 4.0 / rg, su = 4.0 / ru;

        // fp64 from the same inputs, rounded to the dtype where the kernels (and the addmm path) round.
        Tensor F(Tensor t) => t.to(ScalarType.Float64);
        Tensor Round(Tensor t) => t.to(dtype).to(ScalarType.Float64);
        var G = Round(F(g) + sg * F(xa).narrow(1, 0, rg).mm(F(bg).t()));
        var U = Round(F(u) + su * F(xa).narrow(1, rg, ru).mm(F(bu).t()));
        var D = Round(F(dh) + F(xd).mm(F(ad)));
        var sig = G.sigmoid();
        var act = Round(G * sig);
        var h = act * U;
        var dU = D * act;
        var dG = D * U * sig * (1 + G * (1 - sig));

        Tensor On(Tensor t) => t.to(Dev);
        var (gd, ud, dhd, xad) = (On(g), On(u), On(dh), On(xa));
        Assert.True(LoraMlpKernels.Applies("silu", gd, ud, rg, ru, rd));
        var (fwd, bwd) = (LoraMlpKernels.ForwardLaunches, LoraMlpKernels.BackwardLaunches);
        var (tol, atol) = (2e-2, 5e-3);
        var hf = LoraMlpKernels.Forward(gd, ud, xad.narrow(1, 0, rg), On(bg), sg, xad.narrow(1, rg, ru), On(bu), su);
        FusedKernelTests.AssertClose(hf.cpu(), h.to(ScalarType.Float32), tol, atol, "forward h");
        var gBefore = gd.cpu();
        var (dg, du, hb) = LoraMlpKernels.Backward(dhd, On(xd), On(ad), gd, ud, xad.narrow(1, 0, rg), On(bg), sg, xad.narrow(1, rg, ru), On(bu), su, wantH);
        Assert.Equal(fwd + 1, LoraMlpKernels.ForwardLaunches);
        Assert.Equal(bwd + 1, LoraMlpKernels.BackwardLaunches);
        Assert.True(ReferenceEquals(dg, dhd) && ReferenceEquals(du, ud), "dG, dU are written over dh and u");
        FusedKernelTests.AssertClose(dg.cpu(), dG.to(ScalarType.Float32), tol, atol, "dg");
        FusedKernelTests.AssertClose(du.cpu(), dU.to(ScalarType.Float32), tol, atol, "du");
        if (wantH)
        {
            Assert.True(ReferenceEquals(hb, gd), "h is written over g");
            FusedKernelTests.AssertClose(hb!.cpu(), h.to(ScalarType.Float32), tol, atol, "backward h");
        }
        else
        {
            Assert.Null(hb);
            Assert.True(Exact.Equal(gd.cpu(), gBefore), "g is left alone when h is not asked for");
        }
    }

    [Theory]
    // dtype, tokens, width, ranks of gate, up, down, h wanted, stages, tokens per block (0: one wave), backward blocks per
    // multiprocessor
    [InlineData(ScalarType.BFloat16, 150L, 136L, 16, 16, 16, true, 2, 64, 3)]
    [InlineData(ScalarType.BFloat16, 300L, 520L, 16, 16, 16, true, 3, 128, 3)]
    [InlineData(ScalarType.BFloat16, 37L, 264L, 16, 0, 16, false, 3, 16, 3)]
    [InlineData(ScalarType.BFloat16, 150L, 136L, 32, 16, 48, true, 2, 32, 3)]
    [InlineData(ScalarType.BFloat16, 70L, 72L, 64, 64, 32, true, 3, 48, 3)]
    [InlineData(ScalarType.Float16, 150L, 264L, 16, 64, 16, true, 3, 64, 3)]
    [InlineData(ScalarType.Float16, 9L, 264L, 32, 32, 0, true, 2, 16, 3)]
    [InlineData(ScalarType.BFloat16, 300L, 520L, 16, 16, 16, true, 2, 64, 4)]
    [InlineData(ScalarType.Float16, 150L, 136L, 16, 16, 16, false, 3, 128, 4)]
    [InlineData(ScalarType.BFloat16, 3000L, 264L, 16, 16, 16, true, 3, 0, 3)] // tokens per block: one wave
    [InlineData(ScalarType.BFloat16, 2000L, 136L, 32, 16, 16, true, 2, 0, 4)]
    public void The_pipelined_kernels_give_the_register_kernels_bits(ScalarType dtype, long rows, long cols, int rg, int ru, int rd,
        bool wantH, int stages, int rowsPerBlock, int backwardBlocks)
    {
        if (!TestDevice.IsCuda)
        {
            using var z = zeros([16, 16], dtype);
            Assert.False(LoraMlpKernels.Applies("silu", z, z, 16, 16, 16));
            return;
        }
        using var scope = NewDisposeScope();
        var gen = new Generator(83);
        Tensor R(long[] shape, double scale = 1) => (randn(shape, ScalarType.Float32, generator: gen) * scale).to(dtype).to(Dev);
        var (g, u, dh) = (R([rows, cols]), R([rows, cols]), R([rows, cols]));
        var (xa, xd) = (R([rows, rg + ru]), rd == 0 ? null : R([rows, rd], 0.5));
        var (bg, bu, ad) = (rg == 0 ? null : R([cols, rg]), ru == 0 ? null : R([cols, ru]), rd == 0 ? null : R([rd, cols], 0.5));
        double sg = rg == 0 ? 0 : 4.0 / rg, su = ru == 0 ? 0 : 4.0 / ru;
        Assert.True(LoraMlpKernels.Applies("silu", g, u, rg, ru, rd));
        Tensor? XaGate() => rg == 0 ? null : xa.narrow(1, 0, rg);
        Tensor? XaUp() => ru == 0 ? null : xa.narrow(1, rg, ru);

        // Forward h, then backward's dg, du, h (on copies: backward writes over dh, g, u).
        Tensor[] Run(int s)
        {
            var (rowsBefore, stagesBefore, blocksBefore) = (LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages, LoraMlpKernels.BackwardBlocksPerSm);
            var fastBefore = LoraMlpKernels.FastSigmoid;
            LoraMlpKernels.FastSigmoid = false; // the exact sigmoid: the same bits as the register kernels
            LoraMlpKernels.RowsPerBlock = (rowsPerBlock, rowsPerBlock);
            LoraMlpKernels.Stages = (s, s);
            LoraMlpKernels.BackwardBlocksPerSm = backwardBlocks;
            try
            {
                var h = LoraMlpKernels.Forward(g, u, XaGate(), bg, sg, XaUp(), bu, su);
                var (dg, du, hb) = LoraMlpKernels.Backward(dh.clone(), xd, ad, g.clone(), u.clone(), XaGate(), bg, sg, XaUp(), bu, su, wantH);
                return hb is null ? [h, dg, du] : [h, dg, du, hb];
            }
            finally
            {
                (LoraMlpKernels.RowsPerBlock, LoraMlpKernels.Stages, LoraMlpKernels.BackwardBlocksPerSm) = (rowsBefore, stagesBefore, blocksBefore);
                LoraMlpKernels.FastSigmoid = fastBefore;
            }
        }
        var pipe = LoraMlpKernels.PipelinedLaunches;
        var register = Run(0);
        Assert.Equal(pipe, LoraMlpKernels.PipelinedLaunches);
        var pipelined = Run(stages);
        Assert.Null(LoraMlpKernels.PipelinedCompileFailure);
        Assert.Equal(pipe + 2, LoraMlpKernels.PipelinedLaunches);
        Assert.Equal(register.Length, pipelined.Length);
        string[] names = ["forward h", "dg", "du", "backward h"];
        for (var i = 0; i < register.Length; i++)
            Assert.True(Exact.Equal(pipelined[i], register[i]), $"{names[i]}: the pipelined kernels differ from the register kernels");
    }

    // LORAHUB_LORA_MLP_BENCH=FILE: microseconds per launch at llama-1b's MLP (8192 tokens × 8192, bf16, ranks 16; backward
    // with h) per kernel variant (stages, tokens per block, tiles per step, backward blocks per multiprocessor, approximate
    // sigmoid, DoRA's row scales), appended to FILE as lines "mlp-bench ... us=T", and the plain SwiGLU forward kernel for
    // reference. Host stopwatch over 30 launches queued back to back (each ~100-400 µs: GPU-bound). Backward works in
    // place, so each of its launches follows a copy of the original dh, g, u into place (a launch on drifted values would
    // soon meet inf/NaN, and the exact sigmoid's reciprocal takes a slow path there); the copies' own time, measured
    // alone, is subtracted. Not a speed assertion: the GPU script reads the numbers.
    [Fact]
    public void Llama_1b_shapes_timed_when_asked()
    {
        var file = Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_BENCH");
        if (!TestDevice.IsCuda || string.IsNullOrEmpty(file)) return;
        using var scope = NewDisposeScope();
        const long rows = 8192, cols = 8192;
        const int r = 16;
        // LORAHUB_LORA_MLP_BENCH_ITERATIONS: launches timed per variant (30; e.g. 1 under Nsight Compute).
        var iterations = int.TryParse(Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_BENCH_ITERATIONS"), out var n) && n > 0 ? n : 30;
        var gen = new Generator(89);
        Tensor R(long[] shape, double scale = 1) => (randn(shape, ScalarType.Float32, generator: gen) * scale).to(ScalarType.BFloat16).to(Dev);
        var (g0, u0, dh0) = (R([rows, cols]), R([rows, cols]), R([rows, cols]));
        var (g, u, dh) = (g0.clone(), u0.clone(), dh0.clone());
        var (xa, xd) = (R([rows, 2 * r]), R([rows, r], 0.5));
        var (bg, bu, ad) = (R([cols, r]), R([cols, r]), R([r, cols], 0.1));
        var (xg, xu) = (xa.narrow(1, 0, r), xa.narrow(1, r, r));
        var (cg, cu) = (1 + 0.1 * randn([cols], generator: gen).to(Dev), 1 + 0.1 * randn([cols], generator: gen).to(Dev));
        Assert.True(LoraMlpKernels.Applies("silu", g, u, r, r, r));
        double Time(Action launch) => KernelTimer.Microseconds(launch, iterations);
        void Restore()
        {
            g.copy_(g0);
            u.copy_(u0);
            dh.copy_(dh0);
        }
        var restore = Time(Restore);
        double Backward(Action launch) => Time(() =>
        {
            Restore();
            launch();
        }) - restore;
        var lines = new List<string> { $"mlp-bench restore (3 copies, subtracted from backward) us={restore:F1}" };
        var before = (LoraMlpKernels.Stages, LoraMlpKernels.RowsPerBlock, LoraMlpKernels.TilesInFlight);
        var (blocksBefore, fastBefore) = (LoraMlpKernels.BackwardBlocksPerSm, LoraMlpKernels.FastSigmoid);
        try
        {
            foreach (var (stages, blockRows, mt, fast) in new[] { (0, 128, 1, false), (2, 128, 1, false), (2, 256, 1, false), (3, 128, 1, false),
                         (2, 0, 1, false), (2, 128, 1, true) })
            {
                (LoraMlpKernels.Stages, LoraMlpKernels.RowsPerBlock, LoraMlpKernels.TilesInFlight) = ((stages, 0), (blockRows, 64), (mt, 1));
                LoraMlpKernels.FastSigmoid = fast;
                var us = Time(() => LoraMlpKernels.Forward(g, u, xg, bg, 4.0 / r, xu, bu, 4.0 / r));
                lines.Add($"mlp-bench fwd stages={stages} rows={blockRows} mt={mt}{(fast ? " fast" : "")} us={us:F1}");
            }
            foreach (var (stages, blockRows, blocks, fast) in new[] { (0, 64, 3, false), (2, 64, 3, false), (2, 128, 3, false), (3, 64, 3, false),
                         (2, 64, 4, false), (2, 0, 3, false), (2, 64, 3, true) })
            {
                (LoraMlpKernels.Stages, LoraMlpKernels.RowsPerBlock, LoraMlpKernels.TilesInFlight) = ((0, stages), (128, blockRows), (1, 1));
                (LoraMlpKernels.BackwardBlocksPerSm, LoraMlpKernels.FastSigmoid) = (blocks, fast);
                var us = Backward(() => LoraMlpKernels.Backward(dh, xd, ad, g, u, xg, bg, 4.0 / r, xu, bu, 4.0 / r, wantH: true));
                lines.Add($"mlp-bench bwd stages={stages} rows={blockRows} blocks/SM={(stages == 0 ? 3 : blocks)}{(fast ? " fast" : "")} us={us:F1}");
            }
            LoraMlpKernels.BackwardBlocksPerSm = 3;
            // DoRA: gate/up row scales in the kernels (and their gradients' per-block sums).
            foreach (var fast in new[] { false, true })
            {
                (LoraMlpKernels.Stages, LoraMlpKernels.RowsPerBlock, LoraMlpKernels.FastSigmoid) = ((2, 2), (128, 64), fast);
                var tag = $"stages=2{(fast ? " fast" : "")}";
                lines.Add($"mlp-bench fwd_rs {tag} rows=128 us={Time(() => LoraMlpKernels.Forward(g, u, xg, bg, 4.0 / r, xu, bu, 4.0 / r, cg, cu)):F1}");
                var usRs = Backward(() => LoraMlpKernels.Backward(dh, xd, ad, g, u, xg, bg, 4.0 / r, xu, bu, 4.0 / r, true, cg, cu, true, true));
                lines.Add($"mlp-bench bwd_rs {tag} rows=64 us={usRs:F1}");
            }
        }
        finally
        {
            (LoraMlpKernels.Stages, LoraMlpKernels.RowsPerBlock, LoraMlpKernels.TilesInFlight) = before;
            (LoraMlpKernels.BackwardBlocksPerSm, LoraMlpKernels.FastSigmoid) = (blocksBefore, fastBefore);
        }
        Assert.Null(LoraMlpKernels.PipelinedCompileFailure);
        Restore();
        lines.Add($"mlp-bench swiglu_fwd (plain kernel, reference) us={Time(() => torchx.nn.functional.swiglu(g, u)):F1}");
        File.AppendAllLines(file, lines);
    }

    [Fact]
    public void The_switch_off_takes_the_addmm_path_with_the_same_result()
    {
        var gen = new Generator(43);
        var dtype = ScalarType.BFloat16;
        using var gate = new LowRank(Hidden, 136, 16, dtype, gen);
        using var up = new LowRank(Hidden, 136, 16, dtype, gen);
        using var down = new LowRank(136, Hidden, 16, dtype, gen);
        var block = new Block();
        using var x = randn([3, 40, Hidden], generator: gen).to(dtype).to(Dev);
        Tensor Forward()
        {
            using var noGrad = no_grad();
            return LoraFusion.TryMlp(block, "silu", gate, up, down, x, fused: true)!;
        }
        var launches = LoraMlpKernels.ForwardLaunches;
        using var on = Forward();
        Assert.Equal(launches + (TestDevice.IsCuda ? 1 : 0), LoraMlpKernels.ForwardLaunches);
        var enabled = LoraMlpKernels.Enabled;
        LoraMlpKernels.Enabled = false;
        try
        {
            using var off = Forward();
            Assert.Equal(launches + (TestDevice.IsCuda ? 1 : 0), LoraMlpKernels.ForwardLaunches);
            Assert.StartsWith("off", LoraMlpKernels.Report);
            FusedKernelTests.AssertClose(on, off, 3e-2, 3e-2, "output with the kernels off");
        }
        finally
        {
            LoraMlpKernels.Enabled = enabled;
        }
    }

    [Fact]
    public void The_kernels_apply_only_to_cuda_bf16_or_fp16_with_ranks_in_steps_of_16()
    {
        using var g = zeros([4, 16], ScalarType.BFloat16, Dev);
        using var u = zeros([4, 16], ScalarType.BFloat16, Dev);
        Assert.Equal(TestDevice.IsCuda, LoraMlpKernels.Applies("silu", g, u, 16, 16, 16));
        Assert.Equal(TestDevice.IsCuda, LoraMlpKernels.Applies("silu", g, u, 64, 0, 48));
        Assert.False(LoraMlpKernels.Applies("gelu", g, u, 16, 16, 16));
        Assert.False(LoraMlpKernels.Applies("silu", g, u, 8, 16, 16));
        Assert.False(LoraMlpKernels.Applies("silu", g, u, 16, 80, 16));
        using var g32 = zeros([4, 16], ScalarType.Float32, Dev);
        Assert.False(LoraMlpKernels.Applies("silu", g32, g32, 16, 16, 16));
        using var odd = zeros([4, 12], ScalarType.BFloat16, Dev);
        Assert.False(LoraMlpKernels.Applies("silu", odd, odd, 16, 16, 16));
        using var gt = zeros([16, 4], ScalarType.BFloat16, Dev);
        Assert.False(LoraMlpKernels.Applies("silu", gt.t(), u, 16, 16, 16));
    }
}
