using LoRAHub.TorchExtensions.Modules;
using TorchSharp.Modules;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The fused LoRA MLP with its low-rank updates added inside the activation kernels (<see cref="LoraMlpKernels"/>): the
/// forward output and the gradients of x and of every A and B against the composite ops (LoRA's layers: base GEMM, then
/// addmm of the update; the activation; down), fp32 tight and bf16/fp16 loose. Ranks differ between the projections, a
/// projection may have no update, ranks above the 32-wide shared-memory chunk, odd widths (the scalar path, partial
/// column tiles), more tokens than one tile, 4-bit bases, a row-scaled down projection, each activation, and DoRA's row
/// scales on gate/up folded into the kernels (<see cref="LoraMlpKernels.FoldRowScales"/>). On CUDA
/// (LORAHUB_TEST_DEVICE=cuda) the kernels must run (forward and backward launches counted); elsewhere they must not apply
/// and the fused block still matches (the addmm path).
/// </summary>
[Collection(Serial.Name)] // LoraFusion.MlpCount and the launch counters are process-wide: LoraFusionTests must not run alongside
public class LoraMlpKernelTests
{
    private static readonly Device Dev = TestDevice.Current;
    private const long Hidden = 24;

    /// <summary>A frozen Linear with an optional update, computed as LoRA's layer does (update in the input's dtype, one addmm).</summary>
    private sealed class LowRank : nn.Module<Tensor, Tensor>, ILowRankLinear
    {
        private readonly Linear linear;
        private readonly Linear4bit? fourBit;
        private readonly Parameter? a, b, c;
        private readonly double scale;

        public LowRank(long inF, long outF, int rank, ScalarType dtype, Generator gen, bool quantized = false, bool rowScale = false)
            : base(nameof(LowRank))
        {
            linear = nn.Linear(inF, outF, hasBias: false, device: Dev, dtype: dtype);
            using (no_grad()) linear.weight!.copy_(randn([outF, inF], generator: gen) / Math.Sqrt(inF));
            linear.weight!.requires_grad = false;
            if (rank > 0)
            {
                a = new Parameter((randn([rank, inF], generator: gen) / Math.Sqrt(inF)).to(Dev));
                b = new Parameter((randn([outF, rank], generator: gen) * 0.3).to(Dev));
                scale = 2.0 / rank;
            }
            if (rowScale) c = new Parameter((rand([outF], generator: gen) + 0.5).to(Dev));
            if (quantized) fourBit = Linear4bit.FromLinear(LinearLayer.From(linear)!, Dev, "nf4", 64, double_quant: false, compute_dtype: dtype);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            var y = fourBit is null ? linear.call(x) : fourBit.call(x);
            if (a is not null)
            {
                var xa = nn.functional.linear(x, a.to(x.dtype));
                y = torchx.addmm(y.reshape(-1, y.size(-1)), xa.reshape(-1, xa.size(-1)), b!.to(x.dtype).t(), 1, scale).view(y.shape);
            }
            if (c is not null) y = y.to(ScalarType.Float32).mul(c).to(x.dtype);
            return y.MoveToOuterDisposeScope();
        }

        public LowRankParts? low_rank_parts(out string reason)
        {
            reason = "";
            var parts = fourBit is null ? new LowRankParts(linear.weight!, null, a, b, scale) : LowRankParts.FromComputedWeight(fourBit, null, a, b, scale);
            return c is null ? parts : parts with { RowScale = () => c };
        }

        public IEnumerable<Parameter> Trainable() => new[] { a, b, c }.OfType<Parameter>();
    }

    private sealed class Block() : nn.Module("block");

    private static Tensor Composite(string activation, LowRank gate, LowRank up, LowRank down, Tensor x)
    {
        var g = gate.call(x);
        var u = up.call(x);
        var h = activation switch
        {
            "silu" => torchx.nn.functional.swiglu(g, u),
            "gelu" => nn.functional.gelu(g) * u,
            _ => nn.functional.gelu(g, GELU.Approximate.tanh) * u,
        };
        return down.call(h);
    }

    [Theory]
    // dtype, activation, ranks of gate, up, down, intermediate width, tokens per sequence (2 sequences), 4-bit, down scaled
    [InlineData(ScalarType.Float32, "silu", 4, 2, 3, 75, 5, false, false)]
    [InlineData(ScalarType.BFloat16, "silu", 4, 2, 3, 75, 5, false, false)]
    [InlineData(ScalarType.Float32, "silu", 16, 0, 8, 136, 70, false, false)]
    [InlineData(ScalarType.BFloat16, "silu", 16, 0, 8, 136, 70, false, false)]
    [InlineData(ScalarType.Float32, "silu", 0, 5, 0, 136, 70, false, false)]
    [InlineData(ScalarType.Float32, "silu", 40, 33, 64, 136, 70, false, false)]
    [InlineData(ScalarType.BFloat16, "silu", 40, 33, 64, 75, 70, false, false)]
    [InlineData(ScalarType.Float16, "silu", 8, 8, 8, 136, 70, false, false)]
    [InlineData(ScalarType.Float32, "gelu_pytorch_tanh", 4, 6, 3, 75, 70, false, false)]
    [InlineData(ScalarType.BFloat16, "gelu", 4, 6, 3, 136, 5, false, false)]
    [InlineData(ScalarType.Float32, "silu", 8, 4, 4, 136, 70, true, false)]
    [InlineData(ScalarType.BFloat16, "silu", 8, 4, 4, 136, 70, true, false)]
    [InlineData(ScalarType.Float32, "silu", 8, 4, 4, 136, 70, false, true)]
    [InlineData(ScalarType.BFloat16, "silu", 8, 0, 4, 136, 70, false, true)]
    // A rank above the kernels' limit: the addmm path, still exact.
    [InlineData(ScalarType.Float32, "silu", 65, 4, 4, 75, 5, false, false)]
    public void Mlp_with_updates_in_the_kernels_matches_the_composite_path(ScalarType dtype, string activation, int rankGate, int rankUp,
        int rankDown, long inter, long tokens, bool fourBit, bool downScaled)
    {
        var gen = new Generator((ulong)(41 + rankGate + rankUp));
        using var gate = new LowRank(Hidden, inter, rankGate, dtype, gen, fourBit);
        using var up = new LowRank(Hidden, inter, rankUp, dtype, gen, fourBit);
        using var down = new LowRank(inter, Hidden, rankDown, dtype, gen, fourBit, rowScale: downScaled);
        var trainable = gate.Trainable().Concat(up.Trainable()).Concat(down.Trainable()).ToList();
        var block = new Block();
        var x0 = randn([2, tokens, Hidden], generator: gen).to(dtype).to(Dev);
        var dy = randn([2, tokens, Hidden], generator: gen).to(dtype).to(Dev);
        var kernel = TestDevice.IsCuda && Math.Max(rankGate, Math.Max(rankUp, rankDown)) <= LoraMlpKernels.MaxRank;
        var launches = LoraMlpKernels.Launches;

        (Tensor y, Tensor dx, Tensor[] grads) Run(Func<Tensor, Tensor> f)
        {
            foreach (var p in trainable) p.grad = null;
            var x = x0.detach().clone().requires_grad_(true);
            var y = f(x);
            (y.to(ScalarType.Float32) * dy.to(ScalarType.Float32)).sum().backward();
            return (y.detach(), x.grad!.detach().clone(), trainable.Select(p => p.grad!.detach().clone()).ToArray());
        }

        var fused = Run(x => LoraFusion.TryMlp(block, activation, gate, up, down, x, fused: true)
            ?? throw new Xunit.Sdk.XunitException($"not fused: {LoraFusionPaths.Of(block)}"));
        Assert.Null(LoraMlpKernels.CompileFailure);
        Assert.Equal(launches + (kernel ? 2 : 0), LoraMlpKernels.Launches);
        var composite = Run(x => Composite(activation, gate, up, down, x));

        var (rtol, atol) = dtype == ScalarType.Float32 ? (2e-5, 2e-5) : (3e-2, 3e-2);
        FusedKernelTests.AssertClose(fused.y, composite.y, rtol, atol, "output");
        FusedKernelTests.AssertClose(fused.dx, composite.dx, rtol, atol, "dx");
        for (var i = 0; i < trainable.Count; i++)
        {
            Assert.Equal(trainable[i].dtype, fused.grads[i].dtype);
            FusedKernelTests.AssertClose(fused.grads[i], composite.grads[i], rtol, atol, $"gradient of trainable tensor {i}");
        }
    }

    [Theory]
    [InlineData(ScalarType.Float32, false)]
    [InlineData(ScalarType.BFloat16, false)]
    [InlineData(ScalarType.BFloat16, true)]
    public void Row_scales_folded_into_the_kernels_match_the_composite_path(ScalarType dtype, bool fourBit)
    {
        // DoRA's shape: gate and down row-scaled, up plain; with FoldRowScales the kernels take the gate/up scales (and their
        // gradients); down's scale stays with the row-scale kernels.
        var (fold, launches, rowScaleLaunches) = (LoraMlpKernels.FoldRowScales, LoraMlpKernels.Launches, LoraRowScaleKernels.Launches);
        LoraMlpKernels.FoldRowScales = true;
        try
        {
            var gen = new Generator(47);
            using var gate = new LowRank(Hidden, 136, 8, dtype, gen, fourBit, rowScale: true);
            using var up = new LowRank(Hidden, 136, 4, dtype, gen, fourBit);
            using var down = new LowRank(136, Hidden, 6, dtype, gen, fourBit, rowScale: true);
            var trainable = gate.Trainable().Concat(up.Trainable()).Concat(down.Trainable()).ToList();
            Assert.Equal(8, trainable.Count);
            var block = new Block();
            var x0 = randn([2, 70, Hidden], generator: gen).to(dtype).to(Dev);
            var dy = randn([2, 70, Hidden], generator: gen).to(dtype).to(Dev);
            (Tensor y, Tensor dx, Tensor[] grads) Run(Func<Tensor, Tensor> f)
            {
                foreach (var p in trainable) p.grad = null;
                var x = x0.detach().clone().requires_grad_(true);
                var y = f(x);
                (y.to(ScalarType.Float32) * dy.to(ScalarType.Float32)).sum().backward();
                return (y.detach(), x.grad!.detach().clone(), trainable.Select(p => p.grad!.detach().clone()).ToArray());
            }
            var fused = Run(x => LoraFusion.TryMlp(block, "silu", gate, up, down, x, fused: true)
                ?? throw new Xunit.Sdk.XunitException($"not fused: {LoraFusionPaths.Of(block)}"));
            Assert.Null(LoraMlpKernels.CompileFailure);
            Assert.Equal(launches + (TestDevice.IsCuda ? 2 : 0), LoraMlpKernels.Launches);
            Assert.Equal(rowScaleLaunches + (TestDevice.IsCuda ? 1 : 0), LoraRowScaleKernels.Launches);
            var composite = Run(x => Composite("silu", gate, up, down, x));
            var (rtol, atol) = dtype == ScalarType.Float32 ? (2e-5, 2e-5) : (3e-2, 3e-2);
            FusedKernelTests.AssertClose(fused.y, composite.y, rtol, atol, "output");
            FusedKernelTests.AssertClose(fused.dx, composite.dx, rtol, atol, "dx");
            for (var i = 0; i < trainable.Count; i++)
                FusedKernelTests.AssertClose(fused.grads[i], composite.grads[i], rtol, atol, $"gradient of trainable tensor {i}");
        }
        finally
        {
            LoraMlpKernels.FoldRowScales = fold;
        }
    }

    [Theory]
    [InlineData(75L, true)]
    [InlineData(136L, false)]
    public void The_kernels_give_the_fp64_reference_in_fp32_and_write_only_what_they_are_asked_to(long cols, bool wantH)
    {
        // Kernel level, fp32 (rounding to fp32 is all the reference needs): ranks over the 32-wide chunk, row scales, odd and
        // vector widths, 150 tokens (several token tiles). Backward writes dG over dh, dU over u, h over g (only when asked).
        if (!TestDevice.IsCuda)
        {
            Assert.False(LoraMlpKernels.Applies("silu", zeros([2, 8]), zeros([2, 8]), 4, 4, 4));
            return;
        }
        var gen = new Generator(53);
        const long rows = 150, rg = 40, ru = 7, rd = 33;
        Tensor R(long[] shape, double scale = 1) => (randn(shape, ScalarType.Float64, generator: gen) * scale).to(ScalarType.Float32);
        Tensor C(long n) => (rand([n], ScalarType.Float64, generator: gen) + 0.5).to(ScalarType.Float32);
        var (g, u, dh, xa, xd) = (R([rows, cols]), R([rows, cols]), R([rows, cols]), R([rows, rg + ru]), R([rows, rd]));
        var (bg, bu, ad, cg, cu) = (R([cols, rg], 0.3), R([cols, ru], 0.3), R([rd, cols], 0.3), C(cols), C(cols));
        const double sg = 0.5, su = 0.25;

        // The reference in fp64, rounded to fp32 where the kernels round.
        Tensor F(Tensor t) => t.to(ScalarType.Float64);
        Tensor Round(Tensor t) => t.to(ScalarType.Float32).to(ScalarType.Float64);
        var G = Round(F(g) + sg * F(xa).narrow(1, 0, rg).mm(F(bg).t()));
        var U = Round(F(u) + su * F(xa).narrow(1, rg, ru).mm(F(bu).t()));
        var D = Round(F(dh) + F(xd).mm(F(ad)));
        var Gs = Round(G * F(cg));
        var Us = Round(U * F(cu));
        var sig = Gs.sigmoid();
        var act = Round(Gs * sig);
        var h = act * Us;
        var dUs = Round(D * act);
        var dGs = Round(D * Us * sig * (1 + Gs * (1 - sig)));

        var dev = Dev;
        Tensor On(Tensor t) => t.to(dev);
        var (gd, ud, dhd) = (On(g), On(u), On(dh));
        var hFwd = LoraMlpKernels.Forward("silu", gd, ud, On(xa), On(bg), On(bu), sg, su, On(cg), On(cu));
        FusedKernelTests.AssertClose(hFwd.cpu(), h.to(ScalarType.Float32), 1e-5, 1e-6, "forward h");
        var (dg, du, hb, dcg, dcu) = LoraMlpKernels.Backward("silu", dhd, On(xd), On(ad), gd, ud, On(xa), On(bg), On(bu), sg, su, wantH, On(cg), On(cu));
        Assert.True(ReferenceEquals(dg, dhd) && ReferenceEquals(du, ud), "dG, dU are written over dh and u");
        FusedKernelTests.AssertClose(dg.cpu(), (dGs * F(cg)).to(ScalarType.Float32), 1e-5, 1e-6, "dg");
        FusedKernelTests.AssertClose(du.cpu(), (dUs * F(cu)).to(ScalarType.Float32), 1e-5, 1e-6, "du");
        FusedKernelTests.AssertClose(dcg!.cpu(), (dGs * G).sum(dim: 0).to(ScalarType.Float32), 1e-5, 1e-5, "dc_gate");
        FusedKernelTests.AssertClose(dcu!.cpu(), (dUs * U).sum(dim: 0).to(ScalarType.Float32), 1e-5, 1e-5, "dc_up");
        if (wantH) FusedKernelTests.AssertClose(hb!.cpu(), h.to(ScalarType.Float32), 1e-5, 1e-6, "backward h (over g)");
        else
        {
            Assert.Null(hb);
            Assert.Equal(0.0, (gd.cpu() - g).abs().max().ToDouble()); // g left alone when h is not asked for
        }
    }

    [Fact]
    public void The_switch_off_takes_the_addmm_path_with_the_same_result()
    {
        var gen = new Generator(43);
        using var gate = new LowRank(Hidden, 136, 8, ScalarType.Float32, gen);
        using var up = new LowRank(Hidden, 136, 4, ScalarType.Float32, gen);
        using var down = new LowRank(136, Hidden, 6, ScalarType.Float32, gen);
        var block = new Block();
        using var x = randn([3, 40, Hidden], generator: gen).to(Dev);
        Tensor Forward() => LoraFusion.TryMlp(block, "silu", gate, up, down, x, fused: true)!;
        var launches = LoraMlpKernels.Launches;
        using var on = Forward();
        Assert.Equal(launches + (TestDevice.IsCuda ? 1 : 0), LoraMlpKernels.Launches);
        var enabled = LoraMlpKernels.Enabled;
        LoraMlpKernels.Enabled = false;
        try
        {
            using var off = Forward();
            Assert.Equal(launches + (TestDevice.IsCuda ? 1 : 0), LoraMlpKernels.Launches);
            FusedKernelTests.AssertClose(on, off, 2e-5, 2e-5, "output with the kernels off");
        }
        finally
        {
            LoraMlpKernels.Enabled = enabled;
        }
    }

    [Fact]
    public void The_kernels_apply_only_to_cuda_tensors_of_kernel_dtypes_and_supported_activations()
    {
        using var g = zeros([4, 16], device: Dev);
        using var u = zeros([4, 16], device: Dev);
        Assert.Equal(TestDevice.IsCuda, LoraMlpKernels.Applies("silu", g, u, 4, 4, 4));
        Assert.Equal(TestDevice.IsCuda, LoraMlpKernels.Applies("gelu", g, u, 64, 0, 0));
        Assert.False(LoraMlpKernels.Applies("relu", g, u, 4, 4, 4));
        Assert.False(LoraMlpKernels.Applies("silu", g, u, 65, 4, 4));
        using var g64 = zeros([4, 16], ScalarType.Float64, Dev);
        Assert.False(LoraMlpKernels.Applies("silu", g64, g64, 4, 4, 4));
        using var gt = zeros([16, 4], device: Dev);
        Assert.False(LoraMlpKernels.Applies("silu", gt.t(), u, 4, 4, 4));
    }
}
