using LoRAHub.TorchExtensions.Modules;
using TorchSharp.Modules;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The fused LoRA MLP with its low-rank updates formed inside the SwiGLU kernels on tensor cores
/// (<see cref="LoraMlpKernels"/>): the forward output and the gradients of x and of every A and B against the composite ops
/// (LoRA's layers: base GEMM, then addmm of the update; SwiGLU; down), bf16 and fp16, ranks 16..64 and none, token counts
/// that are not a multiple of the 16-token tile, widths that are not a multiple of the 32-column strip; and the kernels
/// themselves against an fp64 reference rounded where they round. On CUDA (LORAHUB_TEST_DEVICE=cuda) the kernels must
/// run where they apply (forward and backward launches counted: a silent fallback fails) and must not where they do
/// not (fp32, a rank that is not a multiple of 16, a width that is not a multiple of 8); elsewhere they never apply and
/// the fused block still matches (the addmm path).
/// </summary>
[Collection(KernelTestsCollection.Name)] // toggles LoraMlpKernels.Enabled / RowsPerBlock and counts its launches (process-wide)
public class LoraMlpMmaKernelTests
{
    private static readonly Device Dev = TestDevice.Current;
    private const long Hidden = 32;

    /// <summary>A frozen Linear with an optional update, computed as LoRA's layer does (update in the input's dtype, one addmm).</summary>
    private sealed class LowRank : nn.Module<Tensor, Tensor>, ILowRankLinear
    {
        private readonly Linear linear;
        private readonly Parameter? a, b;
        private readonly double scale;

        public LowRank(long inF, long outF, int rank, ScalarType dtype, Generator gen) : base(nameof(LowRank))
        {
            linear = nn.Linear(inF, outF, hasBias: false, device: Dev, dtype: dtype);
            using (no_grad()) linear.weight!.copy_(randn([outF, inF], generator: gen) / Math.Sqrt(inF));
            linear.weight!.requires_grad = false;
            if (rank > 0)
            {
                // An update as large as the base output (B ~ N(0, 1), s = 4/r): a wrong column or rank in the kernels' tiles
                // moves results far beyond bf16 rounding.
                a = new Parameter((randn([rank, inF], generator: gen) / Math.Sqrt(inF)).to(Dev));
                b = new Parameter(randn([outF, rank], generator: gen).to(Dev));
                scale = 4.0 / rank;
            }
            RegisterComponents();
        }

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            var y = linear.call(x);
            if (a is not null)
            {
                var xa = nn.functional.linear(x, a.to(x.dtype));
                y = torchx.addmm(y.reshape(-1, y.size(-1)), xa.reshape(-1, xa.size(-1)), b!.to(x.dtype).t(), 1, scale).view(y.shape);
            }
            return y.MoveToOuterDisposeScope();
        }

        public LowRankParts? low_rank_parts(out string reason)
        {
            reason = "";
            return new LowRankParts(linear.weight!, null, a, b, scale);
        }

        public IEnumerable<Parameter> Trainable() => new[] { a, b }.OfType<Parameter>();
    }

    private sealed class Block() : nn.Module("block");

    [Theory]
    // dtype, ranks of gate, up, down, intermediate width, tokens per sequence (2 sequences), tokens per block, tiles per step
    // (forward and backward; 0: the default), kernels expected on CUDA
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 136, 37, 64, 0, true)]
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 136, 37, 32, 1, true)]
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 264, 70, 16, 2, true)]
    [InlineData(ScalarType.BFloat16, 32, 16, 0, 264, 70, 16, 0, true)]
    [InlineData(ScalarType.BFloat16, 0, 48, 64, 512, 5, 64, 0, true)]
    [InlineData(ScalarType.BFloat16, 16, 0, 16, 200, 37, 32, 2, true)]
    [InlineData(ScalarType.BFloat16, 64, 64, 32, 72, 41, 48, 0, true)]
    [InlineData(ScalarType.Float16, 16, 16, 16, 136, 37, 64, 0, true)]
    [InlineData(ScalarType.Float16, 16, 16, 16, 136, 37, 16, 2, true)]
    [InlineData(ScalarType.Float16, 32, 32, 16, 264, 9, 16, 0, true)]
    // Not taken (the addmm path, still matching): a rank not a multiple of 16, fp32, a width not a multiple of 8.
    [InlineData(ScalarType.BFloat16, 8, 16, 16, 136, 37, 64, 0, false)]
    [InlineData(ScalarType.Float32, 16, 16, 16, 136, 37, 64, 0, false)]
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 130, 9, 64, 0, false)]
    public void Mlp_with_updates_in_the_kernels_matches_the_composite_path(ScalarType dtype, int rankGate, int rankUp, int rankDown,
        long inter, long tokens, int rowsPerBlock, int perStep, bool kernel)
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
        var (fwd, bwd) = (LoraMlpKernels.ForwardLaunches, LoraMlpKernels.BackwardLaunches);

        (Tensor y, Tensor dx, Tensor[] grads) Run(Func<Tensor, Tensor> f)
        {
            foreach (var p in trainable) p.grad = null;
            var x = x0.detach().clone().requires_grad_(true);
            var y = f(x);
            (y.to(ScalarType.Float32) * dy.to(ScalarType.Float32)).sum().backward();
            return (y.detach(), x.grad!.detach().clone(), trainable.Select(p => p.grad!.detach().clone()).ToArray());
        }

        var (rows, tiles) = (LoraMlpKernels.RowsPerBlock, LoraMlpKernels.TilesInFlight);
        LoraMlpKernels.RowsPerBlock = (rowsPerBlock, rowsPerBlock);
        if (perStep > 0) LoraMlpKernels.TilesInFlight = (perStep, perStep);
        (Tensor y, Tensor dx, Tensor[] grads) fused;
        try
        {
            fused = Run(x => LoraFusion.TryMlp(block, "silu", gate, up, down, x, fused: true)
                ?? throw new Xunit.Sdk.XunitException($"not fused: {LoraFusionPaths.Of(block)}"));
        }
        finally
        {
            (LoraMlpKernels.RowsPerBlock, LoraMlpKernels.TilesInFlight) = (rows, tiles);
        }
        Assert.Null(LoraMlpKernels.CompileFailure);
        Assert.Equal(fwd + (kernel ? 1 : 0), LoraMlpKernels.ForwardLaunches);
        Assert.Equal(bwd + (kernel ? 1 : 0), LoraMlpKernels.BackwardLaunches);
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
