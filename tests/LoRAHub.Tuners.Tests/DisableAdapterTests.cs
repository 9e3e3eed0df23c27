using LoRAHub.Plugins.DoRA;
using LoRAHub.Plugins.LoRA;

namespace LoRAHub.Tuners.Tests;

/// <summary>PEFT's disable_adapter context: <c>using (adapter.DisableAdapter()) { ... }</c>.</summary>
public class DisableAdapterTests
{
    [Theory]
    [InlineData("lora")]
    [InlineData("dora")]
    public void Inside_the_scope_the_model_is_the_base_model_and_after_it_the_adapter_is_back(string method)
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        IAdapterMethod m = method == "dora" ? new DoraMethod() : new LoraMethod();
        using var adapter = m.Attach(model, new { init_lora_weights = false, target_modules = new[] { "q_proj", "v_proj" } });
        var adapted = model.Forward(x);
        Assert.False(adapted.allclose(baseline, 1e-3, 1e-3));

        using (adapter.DisableAdapter())
        {
            Assert.False(adapter.Enabled);
            Assert.True(model.Forward(x).Equals(baseline));
        }

        Assert.True(adapter.Enabled);
        Assert.True(model.Forward(x).Equals(adapted));
    }

    [Fact]
    public void A_merged_adapter_is_unmerged_inside_and_an_already_disabled_one_stays_disabled()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        using var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions { InitLoraWeights = LoraInit.Random, TargetModules = new[] { "q_proj" } });
        adapter.Merge();
        using (adapter.DisableAdapter())
        {
            Assert.False(adapter.IsMerged); // as PEFT: disabling unmerges
            Assert.True(model.Forward(x).allclose(baseline, 1e-6, 1e-6));
        }

        adapter.Enabled = false;
        var scope = adapter.DisableAdapter();
        scope.Dispose();
        scope.Dispose(); // once only
        Assert.False(adapter.Enabled);
    }
}
