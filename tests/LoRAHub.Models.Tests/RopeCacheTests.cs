using LoRAHub.Models.Llama;

namespace LoRAHub.Models.Tests;

/// <summary>
/// The rotary tables are built once per model and device, not per call: TorchSharp's Device compares by reference, so a
/// cache keyed on `tensor.device != device` rebuilt them on every forward and every checkpoint recompute.
/// </summary>
[Collection(RunsAlone.Name)]
public sealed class RopeCacheTests
{
    [Fact]
    public void Forward_and_checkpoint_recompute_reuse_the_models_rotary_tables()
    {
        using var model = LlamaForCausalLM.CreateRandom(TinyModels.LlamaConfig(), device: TinyModels.Device);
        model.GradientCheckpointing = true;
        using var ids = torch.tensor(new long[,] { { 1, 5, 9, 13, 2, 40 } }, device: TinyModels.Device);
        using (var first = model.ComputeLoss(ids, ids)) first.backward();   // builds the tables once
        var built = RotaryEmbedding.TablesBuilt;
        for (var i = 0; i < 3; i++)
            using (var loss = model.ComputeLoss(ids, ids)) loss.backward(); // forward + a recompute per layer
        Assert.Equal(built, RotaryEmbedding.TablesBuilt);
    }

    [Fact]
    public void Device_checks_compare_type_and_index_not_references()
    {
        using var t = torch.zeros(2, device: TinyModels.Device);
        Assert.True(torchx.is_on(t, new Device(TinyModels.Device.ToString())));
        Assert.False(torchx.is_on(t, new Device(t.device_type == DeviceType.CPU ? "meta" : "cpu")));
        using var u = torch.ones(3, device: TinyModels.Device);
        Assert.True(torchx.same_device(t, u));
    }
}
