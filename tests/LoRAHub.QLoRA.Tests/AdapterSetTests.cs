namespace LoRAHub.QLoRA.Tests;

/// <summary>IAdapterSet on QLoRA (serve/generate mixed batches): each row runs its own adapter over the shared 4-bit base.</summary>
public class AdapterSetTests
{
    private static QLoraOptions Options() => new()
    {
        R = 4, LoraAlpha = 8, Bnb4bitComputeDtype = "float32", Device = TestDevice.Current.ToString(), InitLoraWeights = LoraInit.Random,
    };

    [Fact]
    public void A_mixed_batch_equals_each_adapter_run_alone()
    {
        var dev = TestDevice.Current;
        var x = Tiny.Batch(device: dev);
        var saved = Path.Combine(Path.GetTempPath(), "lorahub-qlora-set-" + Guid.NewGuid().ToString("N"));
        torchx.manual_seed(11); // every generator: the adapters are initialised on the test device
        using (var donor = Tiny.Model())
        using (var other = (QLoraAdapter)new QLoraMethod().Attach(donor, Options()))
            other.Save(saved);

        using var model = Tiny.Model();
        torchx.manual_seed(12);
        using var adapter = (QLoraAdapter)new QLoraMethod().Attach(model, Options());
        IAdapterSet set = adapter;
        set.LoadAdapter(saved, "other");
        Assert.Equal(["default", "other"], set.AdapterNames);

        var first = model.Forward(x);
        adapter.Lora.SetActiveAdapter("other");
        var second = model.Forward(x);
        adapter.Enabled = false;
        var baseline = model.Forward(x);
        adapter.Enabled = true;
        adapter.Lora.SetActiveAdapter("default");
        Assert.False(first.allclose(second, 1e-3, 1e-3));
        Assert.False(first.allclose(baseline, 1e-3, 1e-3));

        Tensor mixed;
        using (set.UseAdapterPerRow(["other", IAdapterSet.BaseName, "default", "other"]))
            mixed = model.Forward(x);
        Assert.True(mixed[0].allclose(second[0], 1e-5, 1e-5));
        Assert.True(mixed[1].allclose(baseline[1], 1e-5, 1e-5));
        Assert.True(mixed[2].allclose(first[2], 1e-5, 1e-5));
        Assert.True(mixed[3].allclose(second[3], 1e-5, 1e-5));

        set.DeleteAdapter("other");
        Assert.Equal(["default"], set.AdapterNames);
        Directory.Delete(saved, recursive: true);
    }
}
