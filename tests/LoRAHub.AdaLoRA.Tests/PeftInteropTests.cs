namespace LoRAHub.AdaLoRA.Tests;

/// <summary>
/// An AdaLoRA adapter saved by Python PEFT 0.21 (scripts/peft/check.sh) loads here with PEFT's logits; the script also
/// checked PEFT loading ours.
/// </summary>
public sealed class PeftInteropTests
{
    [Fact]
    public void Adalora_adapter_saved_by_python_peft_gives_peft_logits()
    {
        var fixture = new PeftFixture("LoRAHub.AdaLoRA.Tests");
        using var model = fixture.LoadBaseModel();
        var baseline = fixture.Logits(model);
        using var adapter = (AdaLoraAdapter)new AdaLoraMethod().Load(model, fixture.AdapterDir);

        Assert.True(fixture.MaxDiff(fixture.Logits(model)) < 1e-4, "logits differ from PEFT's");
        Assert.True(fixture.MaxDiff(baseline) > 1e-2, "the fixture adapter should change the logits");
        Assert.Equal(["k_proj", "o_proj", "up_proj"], adapter.Layers.Keys.Select(path => path.Split('.').Last()).Distinct().Order());
    }
}
