namespace LoRAHub.DoRA.Tests;

/// <summary>
/// DoRA's magnitude is initialised from the base weight, which LoftQ would then replace: the pair is refused by name
/// before the model changes.
/// </summary>
public class LoftQRefusalTests
{
    [Fact]
    public void Dora_with_loftq_is_refused_naming_init_lora_weights()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var before = model.Forward(x).detach().clone();
        var options = Dora.Options(init: LoraInit.LoftQ);
        options.LoftqConfig = new() { ["loftq_bits"] = 4, ["loftq_iter"] = 1 };
        var e = Assert.Throws<AdapterConfigurationException>(() => Dora.Attach(model, options));
        Assert.Contains("init_lora_weights", e.Message);
        Assert.Contains("use_dora", e.Message);
        Assert.True(model.Forward(x).equal(before).all().item<bool>(), "the model must be left as it was");
    }
}
