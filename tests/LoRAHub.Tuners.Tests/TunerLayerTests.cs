using LoRAHub.Plugins.DoRA;
using LoRAHub.Plugins.LoRA;
using LoRAHub.TorchExtensions.Modules;

namespace LoRAHub.Tuners.Tests;

/// <summary>What every adapter layer shares (PEFT's BaseTunerLayer): one base_layer child, and TorchSharp's disposal rule.</summary>
public class TunerLayerTests
{
    [Fact]
    public void A_4bit_base_is_registered_once_as_base_layer()
    {
        var dense = nn.Linear(64, 64);
        using var layer = new LoraLinear(Linear4bit.FromLinear(LinearLayer.From(dense)!, compute_dtype: ScalarType.Float32));
        dense.Dispose();
        layer.UpdateLayer("default", 2, 4, 0, false, LoraInit.Default, ScalarType.Float32);

        Assert.Equal(["base_layer", "lora_A", "lora_B", "lora_dropout"], layer.named_children().Select(c => c.name));
        Assert.Single(layer.named_modules(), m => m.module is Linear4bit);
        Assert.All(layer.state_dict().Keys, k => Assert.True(k.StartsWith("base_layer.") || k.StartsWith("lora_"), k));
        Assert.Equal(64, layer.base_linear.in_features);
    }

    [Fact]
    public void Disposing_a_layer_disposes_its_base_unless_it_was_unwrapped()
    {
        var kept = new LoraLinear(nn.Linear(4, 4));
        var keptWeight = ((Linear)kept.base_layer).weight!;
        var back = kept.Unwrap();
        kept.Dispose();
        Assert.False(keptWeight.IsInvalid);
        back.Dispose();

        var owned = new LoraLinear(nn.Linear(4, 4));
        owned.UpdateLayer("default", 2, 4, 0, false, LoraInit.Default, ScalarType.Float32);
        var weight = ((Linear)owned.base_layer).weight!;
        var a = owned.A("default");
        owned.Dispose();
        Assert.True(weight.IsInvalid);
        Assert.True(a.IsInvalid);
    }

    [Fact]
    public void Disposing_the_model_disposes_what_adapter_layers_hold_beyond_parameters()
    {
        var model = new TinyModel();
        var adapter = (LoraAdapter)new DoraMethod().Attach(model, new DoraOptions { InitLoraWeights = LoraInit.Random, TargetModules = new[] { "q_proj" } });
        adapter.Merge();
        // DoRA keeps m/‖V‖ of the merge on its per-layer module (not a parameter): freed by that module's Dispose.
        var factor = DoraVariant.Layer(adapter.Layers["model.layers.0.self_attn.q_proj"], "default").MergeFactor!;
        Assert.False(factor.IsInvalid);
        model.Dispose();
        Assert.True(factor.IsInvalid);
    }

    [Fact]
    public void A_layer_that_cannot_be_placed_is_freed_and_the_model_left_as_it_was()
    {
        using var model = new TinyModel();
        var before = model.named_parameters().Select(p => p.name).ToList();
        // "q_proj" matches Linears, "self_attn" containers: the plan fails before anything is wrapped.
        var e = Assert.Throws<AdapterConfigurationException>(() => new LoraMethod().Attach(model, new { target_modules = new[] { "q_proj", "self_attn" } }));
        Assert.Contains("self_attn", e.Message);
        Assert.Equal(before, model.named_parameters().Select(p => p.name));
        Assert.DoesNotContain(model.named_modules(), m => m.module is TunerLayer);
    }
}
