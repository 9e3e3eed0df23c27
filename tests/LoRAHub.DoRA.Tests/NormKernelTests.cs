using LoRAHub.Models.Llama;
using Fused = LoRAHub.TorchExtensions.torchx.nn.functional.Fused;
using static LoRAHub.DoRA.Tests.NormReference;

namespace LoRAHub.DoRA.Tests;

/// <summary>
/// DoRA's weight norm kernel (LoraWeightNorms.low_rank_row_norms: ‖W0_i + s·Σ_k B_ik·A_k‖ with V in fp32 registers, one
/// launch): on CUDA (LORAHUB_TEST_DEVICE=cuda) against DoraWeightNorm.Direct and the fp64 definition for bf16, fp16 and fp32
/// W0, fp32 and bf16 adapters, odd in-features, a misaligned W0 and ranks up to 64, with a launch count so a silent fallback
/// fails; its refusals; and in a DoRA layer's training steps: the row scale m/‖V‖ is exactly 1 at init (init and forward
/// compute the norm the same way), the step's cached norm is the kernel's, and it is computed again after an optimizer step
/// and after an announced in-place write (a stale norm misses the fp64 definition by far more than the tolerance); and a
/// tiny Llama trained with the fused blocks and checkpointing: one kernel launch per projection per step (the recompute
/// reuses the step's norm), row scales that follow the definition after the optimizer steps, and the losses of the factored
/// ops. On the CPU the kernel declines (null) and the same layer and model checks run on the tensor ops.
/// </summary>
public class NormKernelTests
{
    [Theory]
    [InlineData(ScalarType.BFloat16, ScalarType.Float32, 70, 37, 5, false)]   // odd in-features: the scalar kernel
    [InlineData(ScalarType.Float16, ScalarType.Float32, 33, 256, 16, false)]
    [InlineData(ScalarType.Float32, ScalarType.Float32, 65, 1000, 64, false)]
    [InlineData(ScalarType.Float32, ScalarType.Float32, 9, 37, 3, false)]
    [InlineData(ScalarType.BFloat16, ScalarType.Float32, 40, 264, 20, false)] // a partial last column tile, rank 16 + 4
    [InlineData(ScalarType.BFloat16, ScalarType.BFloat16, 48, 2048, 64, false)]
    [InlineData(ScalarType.BFloat16, ScalarType.Float32, 24, 256, 8, true)]   // W0 2 bytes off 16-byte alignment
    public void Kernel_norm_equals_the_direct_norm(ScalarType baseType, ScalarType adapterType, int rows, int cols, int r, bool misaligned)
    {
        using var scope = torch.NewDisposeScope();
        torchx.manual_seed(rows + cols + r);
        var flat = torch.randn([rows * cols + 1], ScalarType.Float32, Dev).to(baseType);
        var w0 = (misaligned ? flat.narrow(0, 1, rows * cols) : flat.narrow(0, 0, rows * cols)).view(rows, cols);
        var a = torch.randn([r, cols], ScalarType.Float32, Dev).mul(0.3).to(adapterType);
        var b = torch.randn([rows, r], ScalarType.Float32, Dev).mul(0.5).to(adapterType);
        const double s = 1.75;
        var launches = LoraWeightNorms.LowRankNormLaunches;
        var norm = LoraWeightNorms.low_rank_row_norms(w0, a, b, s);
        if (!Cuda)
        {
            Assert.Null(norm); // the CPU has no kernel: DoRA takes its tensor ops
            return;
        }
        Assert.Null(LoraWeightNorms.CompileFailure);
        Assert.NotNull(norm);
        Assert.Equal(launches + 1, LoraWeightNorms.LowRankNormLaunches);
        Assert.Equal(ScalarType.Float32, norm!.dtype);
        Assert.Equal(new long[] { rows }, norm.shape);
        // V is exact in fp32 registers: fp32 rounding of the sums only.
        var definition = Definition(w0, a, b, s);
        Assert.True(MaxRelative(norm, definition) < 1e-5, $"kernel vs fp64 definition: {MaxRelative(norm, definition)}");
        // The reference path (V materialised in fp32 by a GEMM; looser: were the GEMM allowed TF32, its B·A would be inexact).
        var direct = DoraWeightNorm.Direct(w0, a, b, s);
        Assert.True(MaxRelative(norm, direct) < 2e-4, $"kernel vs DoraWeightNorm.Direct: {MaxRelative(norm, direct)}");
    }

    [Fact]
    public void Kernel_declines_what_it_cannot_take()
    {
        using var scope = torch.NewDisposeScope();
        var w0 = torch.randn([16, 32], ScalarType.BFloat16, Dev);
        var a = torch.randn([4, 32], ScalarType.Float32, Dev);
        var b = torch.randn([16, 4], ScalarType.Float32, Dev);
        var launches = LoraWeightNorms.LowRankNormLaunches;
        Assert.Null(LoraWeightNorms.low_rank_row_norms(w0.to(ScalarType.Float64), a.to(ScalarType.Float64), b.to(ScalarType.Float64), 2.0));
        Assert.Null(LoraWeightNorms.low_rank_row_norms(w0, torch.randn([32, 4], ScalarType.Float32, Dev).t(), b, 2.0)); // A not contiguous
        Assert.Null(LoraWeightNorms.low_rank_row_norms(w0, a, torch.randn([16, 5], ScalarType.Float32, Dev), 2.0));     // ranks differ
        Assert.Null(LoraWeightNorms.low_rank_row_norms(w0, a, b.to(ScalarType.BFloat16), 2.0));                           // A, B types differ
        Assert.Null(LoraWeightNorms.low_rank_row_norms(torch.randn([32, 16], ScalarType.BFloat16, Dev).t(), a, b, 2.0));   // W0 not contiguous
        var saved = LoraWeightNorms.LowRankNormKernel;
        try
        {
            LoraWeightNorms.LowRankNormKernel = false;                                                                   // LORAHUB_DORA_NORM_KERNEL=0
            Assert.Null(LoraWeightNorms.low_rank_row_norms(w0, a, b, 2.0));
        }
        finally
        {
            LoraWeightNorms.LowRankNormKernel = saved;
        }
        Assert.Equal(launches, LoraWeightNorms.LowRankNormLaunches);
        if (Cuda) Assert.NotNull(LoraWeightNorms.low_rank_row_norms(w0, a, b, 2.0));
    }

    // A DoRA layer on a frozen Linear (bf16 on CUDA as in training, fp32 on the CPU), fp32 adapter masters, B ≠ 0.
    private static LoraLinear Layer()
    {
        var dtype = Cuda ? ScalarType.BFloat16 : ScalarType.Float32;
        var linear = nn.Linear(40, 24, hasBias: false, device: Dev, dtype: dtype);
        linear.weight!.requires_grad = false;
        var layer = new LoraLinear(linear);
        layer.UpdateLayer("default", 8, 16, 0, false, LoraInit.Random, ScalarType.Float32, variant: new DoraVariant(new DoraOptions()));
        layer.ActiveAdapters = ["default"];
        layer.train();
        return layer;
    }

    // c = m/‖V‖ as the fused blocks get it (the step's cached norm inside a step).
    private static Tensor RowScale(LoraLinear layer)
    {
        var parts = layer.low_rank_parts(out var reason);
        Assert.True(parts?.RowScale is not null, $"no row scale: {reason}");
        using var _ = torch.no_grad();
        return parts!.RowScale!();
    }

    private static Tensor ExpectedRowScale(LoraLinear layer) =>
        Dora.Magnitude(layer).to(ScalarType.Float64).div(Definition(layer.base_linear.dense_weight(), layer.A("default"), layer.B("default"), layer.Scaling("default")));

    [Fact]
    public void At_init_the_row_scale_is_exactly_one()
    {
        var fusedNorm = Fused.DoraNorm;
        Fused.DoraNorm = true;
        try
        {
            torchx.manual_seed(5);
            var launches = LoraWeightNorms.LowRankNormLaunches;
            using var layer = Layer();
            var c = RowScale(layer);
            // Init and forward compute ‖V‖ the same way (the kernel on CUDA), so m/‖V‖ is 1 to the bit.
            Assert.True(c.eq(1).all().item<bool>(), $"m/‖V‖ at init: {c.sub(1).abs().max().ToDouble()} off 1");
            if (Cuda) Assert.Equal(launches + 2, LoraWeightNorms.LowRankNormLaunches);
        }
        finally
        {
            Fused.DoraNorm = fusedNorm;
        }
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void The_steps_norm_is_computed_again_after_an_optimizer_step_and_an_announced_write(bool kernel)
    {
        var (fusedNorm, kernelOn) = (Fused.DoraNorm, LoraWeightNorms.LowRankNormKernel);
        Fused.DoraNorm = true;
        LoraWeightNorms.LowRankNormKernel = kernel;
        try
        {
            torchx.manual_seed(8);
            using var layer = Layer();
            var dora = DoraVariant.Layer(layer, "default");
            using (torch.no_grad()) dora.weight.mul_(torch.rand(dora.weight.shape, dora.weight.dtype, Dev).add(0.5));
            var x = torch.randn([6, 40], ScalarType.Float32, Dev).to(layer.base_linear.weight_dtype);
            using var optimizer = new AdamW([new LoRAHub.TorchExtensions.Optim.ParamGroup([layer.A("default"), layer.B("default"), dora.weight], 5e-2, 0.0)]);
            var expectLaunches = kernel && Cuda;
            // The kernel and the CPU's fp32 ops: fp32 rounding. The factored ops on a bf16 W0 round W0·Aᵀ to bf16 (2⁻⁹ on
            // the cross term); the changes checked are ≥ 2 %, so a stale norm fails either way.
            var tol = Cuda && !kernel ? 5e-3 : 1e-5;

            layer.BeginStep(LoraLinear.NewStepToken());
            var (computed, launches) = (dora.NormComputations, KernelNorms);
            var before = RowScale(layer);
            Assert.Equal(computed + 1, dora.NormComputations);
            Assert.True(MaxRelative(before, ExpectedRowScale(layer)) < tol, $"first row scale: {MaxRelative(before, ExpectedRowScale(layer))}");
            layer.forward(x).to(ScalarType.Float32).pow(2).sum().backward();  // a second use in the step: the cache
            Assert.Equal(computed + 1, dora.NormComputations);
            Assert.Equal(launches + (expectLaunches ? 1 : 0), KernelNorms);
            optimizer.step();
            optimizer.zero_grad();
            layer.EndStep();

            layer.BeginStep(LoraLinear.NewStepToken());
            var after = RowScale(layer);
            Assert.Equal(computed + 2, dora.NormComputations);
            Assert.Equal(launches + (expectLaunches ? 2 : 0), KernelNorms);
            var expected = ExpectedRowScale(layer);
            // The step moved A and B far beyond the tolerance: the old norm would fail the check below.
            Assert.True(MaxRelative(before.div(dora.weight), expected.div(dora.weight.to(ScalarType.Float64))) > 2e-2, "the step did not change the norm");
            Assert.True(MaxRelative(after, expected) < tol, $"after an optimizer step: {MaxRelative(after, expected)} (a stale norm?)");

            // An in-place write inside the step, announced (TorchSharp has no version counter that would see it).
            using (torch.no_grad()) layer.B("default").mul_(-2);
            layer.MarkAdapterWeightsChanged();
            var written = RowScale(layer);
            Assert.Equal(computed + 3, dora.NormComputations);
            Assert.True(MaxRelative(written, ExpectedRowScale(layer)) < tol, "after an announced write to B (a stale norm?)");
            Assert.True(MaxRelative(written, after) > 2e-2, "the write did not change the norm");
            layer.EndStep();
        }
        finally
        {
            (Fused.DoraNorm, LoraWeightNorms.LowRankNormKernel) = (fusedNorm, kernelOn);
        }
    }

    [Fact]
    public void Llama_training_takes_one_kernel_norm_per_projection_per_step()
    {
        var (fusedNorm, kernelOn) = (Fused.DoraNorm, LoraWeightNorms.LowRankNormKernel);
        Fused.DoraNorm = true;
        try
        {
            LoraWeightNorms.LowRankNormKernel = true;
            var (kernelLosses, launches, layers) = Train(checkRowScales: true);
            // 2 layers × 7 projections, 3 steps, once each: the checkpoint recompute hits the step's cache.
            Assert.Equal(Cuda ? 3 * 2 * 7 : 0, launches);
            Assert.Equal(2 * 7, layers);
            LoraWeightNorms.LowRankNormKernel = false;
            var (factoredLosses, none, _) = Train(checkRowScales: false);
            Assert.Equal(0, none);
            // The kernel's exact V vs the factored ops (which round W0·Aᵀ to bf16 on a bf16 base): the same training.
            for (var i = 0; i < kernelLosses.Count; i++)
                Assert.True(Math.Abs(kernelLosses[i] - factoredLosses[i]) <= (Cuda ? 1e-2 : 1e-6) * Math.Abs(factoredLosses[i]),
                    $"step {i}: kernel {kernelLosses[i]}, factored {factoredLosses[i]}");
        }
        finally
        {
            (Fused.DoraNorm, LoraWeightNorms.LowRankNormKernel) = (fusedNorm, kernelOn);
        }
    }

    // Three steps of a 2-layer Llama (bf16 on CUDA) with DoRA on all seven projections, fused blocks, checkpointing.
    private static (List<double> losses, long launches, int layers) Train(bool checkRowScales)
    {
        using var run = new TinyDoraLlama();
        var (model, adapter) = (run.Model, run.Adapter);
        var launches = KernelNorms;
        var losses = run.Train(3);
        launches = KernelNorms - launches;
        Assert.Equal("qkv: fused n=2 [0-1]; mlp: fused n=2 [0-1]; o_proj: fused n=2 [0-1]", LoraFusionPaths.Report(model.named_modules()));
        if (checkRowScales)
        {
            // After the optimizer steps every projection's row scale is m/‖V‖ of the new weights.
            adapter.OnStepBegin(3);
            foreach (var (name, layer) in adapter.Layers)
                Assert.True(MaxRelative(RowScale(layer), ExpectedRowScale(layer)) < 1e-5, $"{name}: a stale or inexact norm");
            adapter.OnStepEnd(3);
        }
        return (losses, launches, adapter.Layers.Count);
    }
}
