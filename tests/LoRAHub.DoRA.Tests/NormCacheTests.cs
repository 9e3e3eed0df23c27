using LoRAHub.TorchExtensions.Optim;
using F = TorchSharp.torch.nn.functional;
using Fused = LoRAHub.TorchExtensions.torchx.nn.functional.Fused;

namespace LoRAHub.DoRA.Tests;

/// <summary>
/// The per-layer cache of the detached norm ‖W0 + s·B·A‖: reused by the checkpoint recompute of a training step, and
/// never served stale after an optimizer step, a merge/unmerge, a write to the base weight, a new base weight tensor, a
/// load or a new scaling — and kept where the base weight only moved to other storage (StackedBases' re-home).
/// TorchSharp has no tensor version counter, so the cache lives only inside a training step (IAdapter.OnStepBegin ..
/// OnStepEnd, which the trainer calls around each optimizer step); within it LoRAHub's own writes invalidate it, and
/// other in-place writes are announced with MarkWeightsChanged. Outside a step nothing is cached. Each case checks the
/// output against W' = m ⊙ V/‖V‖ in fp64, which a stale norm misses by far more than the tolerance.
/// </summary>
public class NormCacheTests
{
    private sealed class Fixture : IDisposable
    {
        public readonly TinyModel Model = new(dtype: ScalarType.Float64, bias: true);
        public readonly LoraAdapter Adapter;
        public readonly LoraLinear Layer;
        public readonly DoraLinearLayer Dora;
        public readonly Tensor X;
        private readonly bool fusedNorm = Fused.DoraNorm;

        public Fixture()
        {
            Fused.DoraNorm = true;
            Adapter = DoRA.Tests.Dora.Attach(Model, DoRA.Tests.Dora.Options(init: LoraInit.Random));
            DoRA.Tests.Dora.PerturbMagnitudes(Adapter);
            Layer = Adapter.Layers[DoRA.Tests.Dora.Q0];
            Dora = DoraVariant.Layer(Layer, "default");
            X = torch.randn([3, 2, TinyModel.DefaultHidden], ScalarType.Float64);
        }

        public Tensor Expected() => F.linear(X, DoRA.Tests.Dora.MergedWeight(Layer), Layer.base_linear.bias);

        public Tensor Norm()
        {
            var v = Layer.base_linear.dense_weight().add(Layer.B("default").matmul(Layer.A("default")), alpha: Layer.Scaling("default"));
            return v.norm(dim: 1).detach();
        }

        public void AssertDefinition(string when)
        {
            var y = Layer.forward(X);
            Assert.True(y.allclose(Expected(), 1e-12, 1e-12), $"{when}: the output is not m·V/‖V‖ (a stale norm?)");
        }

        public void Dispose()
        {
            Adapter.Dispose();
            Model.Dispose();
            Fused.DoraNorm = fusedNorm;
        }
    }

    [Fact]
    public void The_recompute_reuses_the_norm_and_an_optimizer_step_invalidates_it()
    {
        using var f = new Fixture();
        f.Adapter.OnStepBegin(0);                                       // the trainer opens each step
        var computed = f.Dora.NormComputations;
        using (torch.no_grad()) f.Layer.forward(f.X);                   // a checkpointed block's first pass
        Assert.Equal(computed + 1, f.Dora.NormComputations);
        var y = f.Layer.forward(f.X);                                   // its recompute under autograd: served from the cache
        Assert.Equal(computed + 1, f.Dora.NormComputations);
        Assert.True(y.allclose(f.Expected(), 1e-12, 1e-12));
        var normBefore = f.Norm();

        y.pow(2).sum().backward();
        using var optimizer = new AdamW(f.Adapter.ParameterGroups(1e-2, 0.0));
        optimizer.step();
        optimizer.zero_grad();
        f.Adapter.OnStepEnd(0);                                         // ... and closes it after the optimizer step
        // The step moved A and B enough that the old norm would be visibly wrong.
        Assert.False(f.Norm().allclose(normBefore, 1e-6, 0), "the step did not change the norm");
        f.Adapter.OnStepBegin(1);
        f.AssertDefinition("after an optimizer step");
        Assert.Equal(computed + 2, f.Dora.NormComputations);
        f.AssertDefinition("again after the step");
        Assert.Equal(computed + 2, f.Dora.NormComputations);
        f.Adapter.OnStepEnd(1);
    }

    [Fact]
    public void Under_activation_checkpointing_the_recompute_reuses_the_norm_and_gives_the_same_gradients()
    {
        using var f = new Fixture();
        var a = f.Layer.A("default");
        f.Layer.forward(f.X).pow(2).sum().backward();                  // reference gradients, no checkpointing
        var expected = a.grad!.clone();
        a.grad = null;

        f.Adapter.OnStepBegin(0);
        var computed = f.Dora.NormComputations;
        var y = torchx.utils.checkpoint(h => f.Layer.forward(h), f.X);
        Assert.Equal(computed + 1, f.Dora.NormComputations);
        y.pow(2).sum().backward();                                      // recomputes the layer: the norm comes from the cache
        Assert.Equal(computed + 1, f.Dora.NormComputations);
        Assert.True(a.grad!.allclose(expected, 1e-12, 1e-12));
        f.Adapter.OnStepEnd(0);
    }

    [Fact]
    public void Outside_a_training_step_nothing_is_cached_so_a_bare_optimizer_step_is_seen()
    {
        using var f = new Fixture();
        var computed = f.Dora.NormComputations;
        using (torch.no_grad()) f.Layer.forward(f.X);
        var y = f.Layer.forward(f.X);
        Assert.True(y.allclose(f.Expected(), 1e-12, 1e-12));
        var normBefore = f.Norm();
        // A loop of one's own, without the adapter's step hooks.
        y.pow(2).sum().backward();
        using var optimizer = new AdamW(f.Adapter.ParameterGroups(1e-2, 0.0));
        optimizer.step();
        Assert.False(f.Norm().allclose(normBefore, 1e-6, 0), "the step did not change the norm");
        f.AssertDefinition("after a bare optimizer step");
        Assert.Equal(computed, f.Dora.NormComputations);
    }

    [Fact]
    public void Merge_unmerge_and_base_weight_writes_invalidate_the_norm()
    {
        using var f = new Fixture();
        f.Model.eval();
        f.Adapter.OnStepBegin(0);
        f.AssertDefinition("first");
        var computed = f.Dora.NormComputations;
        var expected = f.Expected();
        f.Adapter.Merge();
        Assert.True(f.Layer.forward(f.X).allclose(expected, 1e-12, 1e-12), "merged");
        // Unmerging restores W0 up to rounding: the version changed, so the norm is computed again.
        f.Adapter.Unmerge();
        f.AssertDefinition("after unmerge");
        Assert.Equal(computed + 1, f.Dora.NormComputations);

        using (torch.no_grad())
        {
            // Through the layer (as a merge writes), then in place behind its back, announced (no version counter sees it).
            f.Layer.AddToBaseWeight(torch.randn([TinyModel.DefaultHidden, TinyModel.DefaultHidden], ScalarType.Float64).mul(0.5));
            f.AssertDefinition("after AddToBaseWeight");
            ((Linear)f.Layer.base_layer).weight.mul_(1.5);
            f.Layer.MarkWeightsChanged();
            f.AssertDefinition("after an in-place write to the base weight");
        }
        Assert.Equal(computed + 3, f.Dora.NormComputations);

        // Outside a step an unannounced write is seen: nothing is cached there.
        f.Adapter.OnStepEnd(0);
        using (torch.no_grad()) ((Linear)f.Layer.base_layer).weight.mul_(0.75);
        f.AssertDefinition("after an unannounced write outside a step");
        Assert.Equal(computed + 3, f.Dora.NormComputations);
    }

    [Fact]
    public void A_base_weight_moved_to_other_storage_keeps_the_norm_and_a_new_weight_tensor_does_not()
    {
        using var f = new Fixture();
        f.Model.eval();
        f.Adapter.OnStepBegin(0);
        f.AssertDefinition("first");
        var computed = f.Dora.NormComputations;
        var weight = ((Linear)f.Layer.base_layer).weight!;
        // As StackedBases re-homes q, k, v into one storage (set_: the same tensor and values, another storage): the
        // step's norm still holds and is served.
        using (torch.no_grad()) weight.set_(weight.detach().clone());
        f.AssertDefinition("after moving the base weight to another storage");
        Assert.Equal(computed, f.Dora.NormComputations);
        // A new weight tensor (a load that replaces the Parameter, a .to()) is another key, announced or not.
        ((Linear)f.Layer.base_layer).weight = new Parameter(weight.detach().mul(1.25), requires_grad: false);
        f.AssertDefinition("after replacing the base weight");
        Assert.Equal(computed + 1, f.Dora.NormComputations);
        f.Adapter.OnStepEnd(0);
    }

    [Fact]
    public void A_new_scaling_or_loaded_weights_invalidate_the_norm()
    {
        var other = DoRA.Tests.Dora.TempDir();
        using (var model = new TinyModel(dtype: ScalarType.Float64, bias: true))
        {
            torchx.manual_seed(42);
            using var adapter = DoRA.Tests.Dora.Attach(model, DoRA.Tests.Dora.Options(init: LoraInit.Random));
            DoRA.Tests.Dora.PerturbMagnitudes(adapter, seed: 9);
            adapter.Save(other);
        }
        using var f = new Fixture();
        f.Model.eval();
        f.Adapter.OnStepBegin(0);
        f.AssertDefinition("first");
        f.Adapter.LoadAdapter(other, "default");                         // a hot swap writes A, B and m in place (same alpha)
        f.AssertDefinition("after loading other weights");
        f.Layer.SetScaling("default", 3.0, useRslora: false);
        f.AssertDefinition("after SetScaling");
        using (torch.no_grad()) f.Layer.B("default").copy_(torch.randn([TinyModel.DefaultHidden, 4], ScalarType.Float64));
        f.Layer.MarkWeightsChanged();
        f.AssertDefinition("after copying into B");
        f.Adapter.OnStepEnd(0);
        using (torch.no_grad()) f.Layer.A("default").mul_(2);
        f.AssertDefinition("after scaling A in place, outside a step");
    }

    [Fact]
    public void With_the_switch_off_or_an_attached_norm_nothing_is_cached()
    {
        using var f = new Fixture();
        f.Adapter.OnStepBegin(0);
        var computed = f.Dora.NormComputations;
        Fused.DoraNorm = false;
        f.AssertDefinition("C# norm");
        Assert.Equal(computed, f.Dora.NormComputations);
        Fused.DoraNorm = true;
        f.Adapter.AddAdapter("exact", DoRA.Tests.Dora.Options(init: LoraInit.Random, detach: false));
        f.Adapter.SetActiveAdapter("exact");
        var exact = DoraVariant.Layer(f.Layer, "exact");
        f.Layer.forward(f.X).sum().backward();
        Assert.Equal(0, exact.NormComputations);
        Assert.NotNull(f.Layer.A("exact").grad);
        f.Adapter.OnStepEnd(0);
    }
}
