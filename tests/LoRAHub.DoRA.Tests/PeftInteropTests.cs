namespace LoRAHub.DoRA.Tests;

/// <summary>
/// A DoRA adapter (use_dora, perturbed magnitudes) saved by Python PEFT 0.21 loads here with PEFT's logits; the script
/// that made it (scripts/peft/check.sh) also checked PEFT loading ours.
/// </summary>
public sealed class PeftInteropTests
{
    [Fact]
    public void Dora_adapter_saved_by_python_peft_gives_peft_logits()
    {
        var fixture = new PeftFixture("LoRAHub.DoRA.Tests");
        using var model = fixture.LoadBaseModel();
        var baseline = fixture.Logits(model);
        using var adapter = (LoraAdapter)new DoraMethod().Load(model, fixture.AdapterDir);

        Assert.True(fixture.MaxDiff(fixture.Logits(model)) < 1e-4, "logits differ from PEFT's");
        Assert.True(fixture.MaxDiff(baseline) > 1e-2, "the fixture adapter should change the logits");
        Assert.Equal(["k_proj", "o_proj", "up_proj"], adapter.Layers.Keys.Select(k => k.Split('.').Last()).Distinct().Order());
        Assert.Contains(adapter.StateDict().Keys, k => k.EndsWith(".lora_magnitude_vector", StringComparison.Ordinal));
    }
}
