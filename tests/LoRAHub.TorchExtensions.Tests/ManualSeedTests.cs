namespace LoRAHub.TorchExtensions.Tests;

/// <summary>torchx.manual_seed seeds every generator, as PyTorch's torch.manual_seed (TorchSharp's seeds only the CPU's).</summary>
[Collection(KernelTestsCollection.Name)] // reseeds the process-wide generators
public class ManualSeedTests
{
    [Fact]
    public void The_same_seed_repeats_random_values_on_cpu_and_on_every_gpu()
    {
        using var scope = NewDisposeScope();
        var devices = new List<Device> { CPU };
        if (cuda.is_available()) devices.AddRange(Enumerable.Range(0, (int)cuda.device_count()).Select(i => new Device(DeviceType.CUDA, i)));
        foreach (var device in devices)
        {
            torchx.manual_seed(42);
            var first = randn([1000], device: device);
            var init = nn.Linear(16, 16, device: device).weight!.detach().clone();
            torchx.manual_seed(42);
            var second = randn([1000], device: device);
            var again = nn.Linear(16, 16, device: device).weight!.detach().clone();
            Assert.True(Exact.Equal(first, second), $"randn on {device} differs after the same seed");
            Assert.True(Exact.Equal(init, again), $"nn.Linear init on {device} differs after the same seed");
            torchx.manual_seed(43);
            Assert.False(Exact.Equal(randn([1000], device: device), first), $"another seed gave the same values on {device}");
        }
    }

    /// <summary>Here, not in OpsTests: a test of another class drawing from the CPU generator between the save and the
    /// restore moved the sequence (CI, 2026-12-01), and this collection runs alone.</summary>
    [Fact]
    public void Rng_state_round_trips()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(42);
        var state = torchx.get_rng_state();
        var c = rand([4]).data<float>().ToArray();
        torchx.set_rng_state(state);
        Assert.Equal(c, rand([4]).data<float>().ToArray());
    }
}
