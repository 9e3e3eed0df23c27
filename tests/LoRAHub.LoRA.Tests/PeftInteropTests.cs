namespace LoRAHub.LoRA.Tests;

/// <summary>
/// An adapter saved by Python PEFT 0.21 loads here with PEFT's logits. The other direction (PEFT loading ours) is
/// checked by scripts/peft/check.sh, which also made this fixture.
/// </summary>
public sealed class PeftInteropTests
{
    [Fact]
    public void Adapter_saved_by_python_peft_gives_peft_logits()
    {
        var fixture = new PeftFixture("LoRAHub.LoRA.Tests");
        using var model = fixture.LoadBaseModel();
        var baseline = fixture.Logits(model);
        using var adapter = (LoraAdapter)new LoraMethod().Load(model, fixture.AdapterDir);

        Assert.True(fixture.MaxDiff(fixture.Logits(model)) < 1e-4, "logits differ from PEFT's");
        Assert.True(fixture.MaxDiff(baseline) > 1e-2, "the fixture adapter should change the logits");
        Assert.Equal(["k_proj", "o_proj", "up_proj"], adapter.Layers.Keys.Select(k => k.Split('.').Last()).Distinct().Order());
    }
}
