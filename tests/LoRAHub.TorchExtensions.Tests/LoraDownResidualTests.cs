using LoRAHub.TorchExtensions.Cuda;
using Block = LoRAHub.TorchExtensions.Tests.FixtureBlock;
using LowRank = LoRAHub.TorchExtensions.Tests.LowRankFixture;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The fused LoRA MLP with the decoder's residual r as an input (<see cref="LoraFusion.TryMlpResidual"/>): r + mlp(x)
/// against r + the composite ops (LoRA's layers, SwiGLU, down), the output and the gradients of x, r and every A, B and
/// row scale (c, and c = m/n with m's gradient), LoRA and DoRA, bf16 and fp16 with ranks 0..64 (partial k-steps, odd
/// token counts, widths that are not a multiple of the 64-column strip), fp32 (the add as a tensor op); the kernel
/// (<see cref="LoraDownResidualKernels"/>) alone against an fp64 reference, its scaled output included; the switch off and
/// a kernel that does not compile (both: the tensor-op add, same results). On CUDA (LORAHUB_TEST_DEVICE=cuda) the kernel
/// must run where it applies (launches counted: a silent fallback fails); elsewhere the add is a tensor op inside the
/// fused block, which must still match.
/// </summary>
[Collection(KernelTestsCollection.Name)] // toggles LoraFusion.MlpResidual, swaps the kernel's source, counts its launches (process-wide)
public class LoraDownResidualTests
{
    private static readonly Device Dev = TestDevice.Current;

    // A width that is a multiple of 8 but not of the 64-column strip of a warp.
    private const long Hidden = 40;

    private static Tensor CompositeMlp(LowRank gate, LowRank up, LowRank down, Tensor x)
    {
        using var scope = NewDisposeScope();
        return down.call(torchx.nn.functional.swiglu(gate.call(x), up.call(x))).MoveToOuterDisposeScope();
    }

    // Same shape and elements (TorchSharp's equal is elementwise).
    private static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    private sealed record Result(Tensor Output, Tensor Dx, Tensor Dr, Tensor[] Grads);

    // Runs r + mlp(x) fused (TryMlpResidual) and composite on the same inputs and upstream gradient; compares the output and
    // the gradients of x, r and every trainable tensor; returns the kernel launches of the fused run and its calls of the
    // fused block with the residual inside.
    private static (long launches, long calls) AssertSameAsComposite(ScalarType dtype, int rankGate, int rankUp, int rankDown, int scales, long inter, long tokens,
        ulong seed)
    {
        var gen = new Generator(seed);
        bool scaled = scales > 0, divided = scales == 2;
        using var gate = new LowRank(Hidden, inter, rankGate, dtype, gen, scaled, divided);
        using var up = new LowRank(Hidden, inter, rankUp, dtype, gen, scaled, divided);
        using var down = new LowRank(inter, Hidden, rankDown, dtype, gen, scaled, divided);
        var trainable = gate.Trainable().Concat(up.Trainable()).Concat(down.Trainable()).ToList();
        var block = new Block();
        var x0 = randn([2, tokens, Hidden], generator: gen).to(dtype).to(Dev);
        var r0 = randn([2, tokens, Hidden], generator: gen).to(dtype).to(Dev);
        var dy = randn([2, tokens, Hidden], generator: gen).to(dtype).to(Dev);

        Result Run(Func<Tensor, Tensor, Tensor> f)
        {
            foreach (var p in trainable) p.grad = null;
            var x = x0.detach().clone().requires_grad_(true);
            var r = r0.detach().clone().requires_grad_(true);
            var y = f(x, r);
            (y.to(ScalarType.Float32) * dy.to(ScalarType.Float32)).sum().backward();
            return new(y.detach(), x.grad!.detach().clone(), r.grad!.detach().clone(), trainable.Select(p => p.grad!.detach().clone()).ToArray());
        }

        var (before, callsBefore) = (LoraFusion.MlpResidualLaunches, LoraFusion.MlpResidualCount);
        var fused = Run((x, r) => LoraFusion.TryMlpResidual(block, "silu", gate, up, down, x, r, fused: true)
            ?? throw new Xunit.Sdk.XunitException($"not fused: {LoraFusionPaths.Of(block)}"));
        var (launches, calls) = (LoraFusion.MlpResidualLaunches - before, LoraFusion.MlpResidualCount - callsBefore);
        Assert.Equal("fused", LoraFusionPaths.Of(block));
        var composite = Run((x, r) => r + CompositeMlp(gate, up, down, x));

        var (rtol, atol) = dtype == ScalarType.Float32 ? (2e-5, 2e-5) : (3e-2, 3e-2);
        FusedKernelTests.AssertClose(fused.Output, composite.Output, rtol, atol, "output");
        FusedKernelTests.AssertClose(fused.Dx, composite.Dx, rtol, atol, "dx");
        // r's gradient is the output's, in both paths exactly.
        Assert.True(Same(fused.Dr, composite.Dr), "the residual's gradient differs from the composite path's");
        Assert.True(Same(fused.Dr, dy), "the residual's gradient is not the upstream gradient");
        Assert.Equal(trainable.Count, fused.Grads.Length);
        for (var i = 0; i < trainable.Count; i++)
        {
            Assert.Equal(trainable[i].dtype, fused.Grads[i].dtype);
            FusedKernelTests.AssertClose(fused.Grads[i], composite.Grads[i], rtol, atol, $"gradient of trainable tensor {i}");
        }
        return (launches, calls);
    }

    [Theory]
    // dtype, ranks of gate, up, down, row scales (0: LoRA, 1: c, 2: c = m/n), intermediate width, tokens per sequence
    // (2 sequences), kernel expected on CUDA
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 0, 136, 37, true)]
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 2, 136, 37, true)]
    [InlineData(ScalarType.BFloat16, 16, 16, 16, 1, 72, 41, true)]
    [InlineData(ScalarType.Float16, 16, 16, 32, 2, 136, 9, true)]
    [InlineData(ScalarType.BFloat16, 16, 16, 8, 2, 136, 37, true)]  // half a k-step
    [InlineData(ScalarType.BFloat16, 0, 16, 6, 0, 72, 20, true)]    // a rank below one pair of the fragments' words
    [InlineData(ScalarType.BFloat16, 16, 16, 48, 1, 72, 16, true)]
    [InlineData(ScalarType.BFloat16, 16, 16, 64, 0, 72, 20, true)]
    [InlineData(ScalarType.BFloat16, 16, 16, 0, 2, 136, 37, true)]  // no update on down: its row scale and the residual
    [InlineData(ScalarType.BFloat16, 16, 16, 0, 0, 136, 37, false)] // neither: the add alone, a tensor op
    [InlineData(ScalarType.BFloat16, 16, 16, 5, 0, 72, 20, false)]  // an odd rank: the tensor ops
    [InlineData(ScalarType.Float32, 4, 2, 3, 2, 24, 5, false)]      // fp32: the tensor ops
    [InlineData(ScalarType.Float32, 4, 2, 16, 0, 24, 5, false)]
    public void Mlp_with_the_residual_matches_the_composite_path(ScalarType dtype, int rankGate, int rankUp, int rankDown, int scales,
        long inter, long tokens, bool kernel)
    {
        var (launches, calls) = AssertSameAsComposite(dtype, rankGate, rankUp, rankDown, scales, inter, tokens, (ulong)(31 + rankDown + inter + scales));
        Assert.Null(LoraDownResidualKernels.CompileFailure);
        Assert.Equal(1, calls);
        Assert.Equal(kernel && TestDevice.IsCuda ? 1 : 0, launches);
    }

    [Fact]
    public void Switched_off_the_residual_is_added_after_the_block()
    {
        var on = LoraFusion.MlpResidual;
        LoraFusion.MlpResidual = false;
        try
        {
            // Added after the block: not its input.
            Assert.Equal((0L, 0L), AssertSameAsComposite(ScalarType.BFloat16, 16, 16, 16, 2, 136, 37, 43));
            Assert.StartsWith("off", LoraFusion.MlpResidualKernel);
        }
        finally
        {
            LoraFusion.MlpResidual = on;
        }
    }

    [Fact]
    public void A_kernel_that_does_not_compile_turns_off_only_itself()
    {
        using (LoraDownResidualKernels.UseSource("extern \"C\" __global__ void lh_down_residual_bf16_k1() { this does not compile }"))
        {
            var mlpBefore = LoraMlpKernels.ForwardLaunches;
            Assert.Equal((0L, 1L), AssertSameAsComposite(ScalarType.BFloat16, 16, 16, 16, 2, 136, 37, 47));
            if (TestDevice.IsCuda)
            {
                Assert.NotNull(LoraDownResidualKernels.CompileFailure);
                Assert.StartsWith("off (did not compile", LoraFusion.MlpResidualKernel);
                // The other kernels still run (only this program is off).
                Assert.True(CudaKernels.Available, CudaKernels.UnavailableReason);
                Assert.True(LoraMlpKernels.ForwardLaunches > mlpBefore, "the MLP's own kernels did not run");
            }
        }
        Assert.Null(LoraDownResidualKernels.CompileFailure);
    }

    [Theory]
    // dtype, rank (0: no update), row scale, c ⊙ inner kept, rows, columns
    [InlineData(ScalarType.BFloat16, 16, true, true, 74, 1032)]
    [InlineData(ScalarType.BFloat16, 16, false, false, 74, 40)]
    [InlineData(ScalarType.BFloat16, 8, true, false, 33, 520)]
    [InlineData(ScalarType.BFloat16, 64, true, true, 20, 64)]
    [InlineData(ScalarType.BFloat16, 0, true, true, 17, 136)]
    [InlineData(ScalarType.Float16, 32, true, true, 50, 264)]
    [InlineData(ScalarType.Float16, 16, false, false, 16, 512)]
    public void The_kernel_matches_an_fp64_reference_on_cuda(ScalarType dtype, int rank, bool rowScale, bool keepScaled, long rows, long cols)
    {
        var gen = new Generator((ulong)(53 + rank + cols));
        using var scope = NewDisposeScope();
        var y = randn([rows, cols], generator: gen).to(dtype).to(Dev);
        var r = (2 * randn([rows, cols], generator: gen)).to(dtype).to(Dev);
        var xa = rank == 0 ? null : randn([rows, rank], generator: gen).to(dtype).to(Dev);
        var b = rank == 0 ? null : (randn([cols, rank], generator: gen) / Math.Sqrt(rank)).to(dtype).to(Dev);
        var c = rowScale ? (1 + 0.3 * randn([cols], generator: gen)).to(Dev) : null;
        const double s = 0.75;
        if (!TestDevice.IsCuda)
        {
            Assert.False(LoraDownResidualKernels.Applies(y, r, xa, b, c, null));
            return;
        }
        Assert.True(LoraDownResidualKernels.Applies(y, r, xa, b, c, null), LoraDownResidualKernels.Report);
        var y0 = y.clone();
        var before = LoraDownResidualKernels.Launches;
        var output = LoraDownResidualKernels.Forward(y, r, xa, b, s, c, keepScaled) ?? throw new Xunit.Sdk.XunitException("the kernel did not load");
        Assert.Equal(before + 1, LoraDownResidualKernels.Launches);

        var inner = y0.to(ScalarType.Float64);
        if (xa is not null) inner = inner + s * xa.to(ScalarType.Float64).mm(b!.to(ScalarType.Float64).t());
        var v = c is null ? inner : inner * c.to(ScalarType.Float64);
        // One rounding of each result (fp32 sums in the kernel: far below it).
        FusedKernelTests.AssertClose(output, r.to(ScalarType.Float64) + v, 1.0 / 128, 1e-4, "output");
        if (keepScaled) FusedKernelTests.AssertClose(y, v, 1.0 / 128, 1e-4, "c ⊙ inner");
        else Assert.True(Same(y, y0), "y was written without keepScaled");
    }

    [Fact]
    public void Llama_1b_shapes_match_the_ops_they_replace_and_are_timed_when_asked()
    {
        // llama-1b's down_proj at 4 × 2048 tokens: 8192 × 2048 bf16, rank 16. On CUDA the kernel against the ops it replaces
        // (addmm of the update, DoRA's row-scale pass, the residual add); with LORAHUB_DOWN_RESIDUAL_BENCH (a file) both are
        // timed (host stopwatch over LORAHUB_DOWN_RESIDUAL_BENCH_ITERATIONS queued launches, default 30), per grid choice.
        if (!TestDevice.IsCuda) return;
        using var scope = NewDisposeScope();
        const long rows = 8192, cols = 2048;
        const int rank = 16;
        const double s = 2.0;
        var gen = new Generator(71);
        Tensor R(long[] shape, double scale = 1) => (randn(shape, ScalarType.Float32, generator: gen) * scale).to(ScalarType.BFloat16).to(Dev);
        var (y0, r, xa, b) = (R([rows, cols]), R([rows, cols], 4), R([rows, rank]), R([cols, rank], 0.05));
        var c = (1 + 0.1 * randn([cols], generator: gen)).to(Dev);
        Assert.True(LoraDownResidualKernels.Applies(y0, r, xa, b, c, null), LoraDownResidualKernels.Report);

        // The ops this kernel replaces: addmm, the row-scale pass, the add (y is theirs: written in place).
        Tensor Ops(Tensor y, bool dora)
        {
            torchx.addmm_(y, xa, b.t(), 1, s);
            if (dora) LoraRowScaleKernels.ScaleRows_(y, c, null);
            return r.add(y);
        }
        foreach (var dora in new[] { false, true })
        {
            var (yk, yo) = (y0.clone(), y0.clone());
            var fused = LoraDownResidualKernels.Forward(yk, r, xa, b, s, dora ? c : null, keepScaled: dora)
                ?? throw new Xunit.Sdk.XunitException("the kernel did not load");
            var ops = Ops(yo, dora);
            // The ops round y + s·xa·Bᵀ and c ⊙ that before the add (the kernel rounds once): where r + c ⊙ inner cancels,
            // their results differ by those roundings, up to an ulp of the largest terms (~2⁻⁸ of the outputs' scale).
            FusedKernelTests.AssertClose(fused, ops, 1.0 / 64, 1.0 / 128, dora ? "DoRA output" : "LoRA output");
            if (dora) FusedKernelTests.AssertClose(yk, yo, 1.0 / 64, 1.0 / 128, "c ⊙ inner");
        }

        var file = Environment.GetEnvironmentVariable("LORAHUB_DOWN_RESIDUAL_BENCH");
        if (string.IsNullOrEmpty(file)) return;
        var iterations = int.TryParse(Environment.GetEnvironmentVariable("LORAHUB_DOWN_RESIDUAL_BENCH_ITERATIONS"), out var n) && n > 0 ? n : 30;
        var y = y0.clone();
        double Time(Action launch) => KernelTimer.Microseconds(launch, iterations);
        var lines = new List<string>();
        var blocksBefore = LoraDownResidualKernels.BlocksPerSm;
        try
        {
            foreach (var blocks in new int?[] { null, 1, 2, 3, 4 })
            {
                LoraDownResidualKernels.BlocksPerSm = blocks;
                var tag = $"blocks/SM={blocks?.ToString() ?? "default"}";
                lines.Add($"down-residual kernel lora {tag} us={Time(() => LoraDownResidualKernels.Forward(y, r, xa, b, s, null, false)):F1}");
                lines.Add($"down-residual kernel dora {tag} us={Time(() => LoraDownResidualKernels.Forward(y, r, xa, b, s, c, false)):F1}");
                lines.Add($"down-residual kernel dora+scaled {tag} us={Time(() => LoraDownResidualKernels.Forward(y, r, xa, b, s, c, true)):F1}");
            }
        }
        finally
        {
            LoraDownResidualKernels.BlocksPerSm = blocksBefore;
        }
        lines.Add($"down-residual ops lora (addmm + add) us={Time(() => Ops(y, false)):F1}");
        lines.Add($"down-residual ops dora (addmm + rowscale + add) us={Time(() => Ops(y, true)):F1}");
        lines.Add($"down-residual add alone us={Time(() => r.add(y)):F1}");
        File.AppendAllLines(file, lines);
    }

    [Fact]
    public void The_kernel_does_not_take_what_it_cannot_compute()
    {
        using var scope = NewDisposeScope();
        var y = randn([16, 40]).to(ScalarType.BFloat16).to(Dev);
        var xa = randn([16, 16]).to(ScalarType.BFloat16).to(Dev);
        var b = randn([40, 16]).to(ScalarType.BFloat16).to(Dev);
        var c = ones([40], device: Dev);
        Assert.Equal(TestDevice.IsCuda, LoraDownResidualKernels.Applies(y, y.clone(), xa, b, c, null));
        // A bias (added after the scale), fp32, a width that is not a multiple of 8, an odd rank, a residual of another shape,
        // neither update nor scale (the add alone).
        Assert.False(LoraDownResidualKernels.Applies(y, y.clone(), xa, b, c, zeros([40], ScalarType.BFloat16, Dev)));
        Assert.False(LoraDownResidualKernels.Applies(y.@float(), y.@float(), xa.@float(), b.@float(), c, null));
        var narrow = randn([16, 36]).to(ScalarType.BFloat16).to(Dev);
        Assert.False(LoraDownResidualKernels.Applies(narrow, narrow.clone(), xa, randn([36, 16]).to(ScalarType.BFloat16).to(Dev), null, null));
        Assert.False(LoraDownResidualKernels.Applies(y, y.clone(), xa.narrow(1, 0, 15).contiguous(), b.narrow(1, 0, 15).contiguous(), c, null));
        Assert.False(LoraDownResidualKernels.Applies(y, y.narrow(0, 0, 8), xa, b, c, null));
        Assert.False(LoraDownResidualKernels.Applies(y, y.clone(), null, null, null, null));
    }
}
