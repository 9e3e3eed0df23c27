namespace LoRAHub.TorchExtensions.Tests;

using F = TorchSharp.torch.nn.functional;

/// <summary>
/// <c>torchx.utils.checkpoint(f, x, offload: true)</c>: the checkpointed inputs go to pinned host memory on a side stream
/// and come back for the recomputation. Gradients equal those of the plain checkpoint; on the CPU offload is a no-op.
/// </summary>
/// <remarks>Serial: the checkpoints' memory counters and the CPU generator are process-wide.</remarks>
[Collection(Serial.Name)]
public class CheckpointOffloadTests
{
    private static readonly Device Dev = TestDevice.Current;
    private const int Layers = 6;

    /// <summary>A stack of checkpointed layers (linear, tanh, dropout); returns the loss and the parameters.</summary>
    private static Tensor Stack(List<nn.Module<Tensor, Tensor>> layers, Tensor x, bool offload)
    {
        var h = x;
        foreach (var layer in layers)
        {
            var next = torchx.utils.checkpoint(t => F.dropout(layer.forward(t).tanh(), 0.1, true), h, offload);
            if (!ReferenceEquals(h, x)) h.Dispose();
            h = next;
        }
        return h;
    }

    private static List<nn.Module<Tensor, Tensor>> MakeLayers(int width)
    {
        torchx.manual_seed(5);
        return Enumerable.Range(0, Layers).Select(_ => (nn.Module<Tensor, Tensor>)nn.Linear(width, width, dtype: ScalarType.Float32, device: Dev)).ToList();
    }

    private static (Tensor loss, Tensor[] grads) Run(List<nn.Module<Tensor, Tensor>> layers, Tensor x, bool offload)
    {
        foreach (var l in layers) l.zero_grad();
        torchx.manual_seed(17); // the same dropout masks in both runs (and the same CUDA seeds drawn by each checkpoint)
        var input = x.detach().requires_grad_(true);
        var y = Stack(layers, input, offload);
        var loss = y.pow(2).sum();
        loss.backward();
        var grads = layers.SelectMany(l => l.parameters()).Select(p => p.grad!.clone()).Append(input.grad!.clone()).ToArray();
        return (loss.detach(), grads);
    }

    [Fact]
    public void Offload_gives_the_gradients_of_the_plain_checkpoint()
    {
        using var scope = NewDisposeScope();
        var layers = MakeLayers(64);
        var x = randn([4, 32, 64], device: Dev);
        var copiesBefore = torchx.utils.checkpoint_offload_stats().Copies;
        var (plainLoss, plain) = Run(layers, x, offload: false);
        var (offLoss, off) = Run(layers, x, offload: true);
        // Each offloaded input went out and came back once on CUDA; nothing is copied on the CPU (a no-op there).
        Assert.Equal(TestDevice.IsCuda ? 2 * Layers : 0, torchx.utils.checkpoint_offload_stats().Copies - copiesBefore);
        Assert.Equal(0, torchx.utils.checkpoint_offload_stats().HostBytes);
        if (TestDevice.IsCuda)
        {
            // The values come back bit for bit; allow for kernels that are not bitwise deterministic.
            Assert.True(plainLoss.allclose(offLoss, 1e-6, 1e-6), $"loss {plainLoss.item<float>()} vs {offLoss.item<float>()}");
            for (var i = 0; i < plain.Length; i++) Assert.True(plain[i].allclose(off[i], 1e-5, 1e-6), $"gradient {i} differs with offload");
        }
        else
        {
            Assert.True(Exact.Equal(plainLoss, offLoss));
            for (var i = 0; i < plain.Length; i++) Assert.True(Exact.Equal(plain[i], off[i]), $"gradient {i} differs with offload");
        }
        foreach (var l in layers) l.Dispose();
    }

    [Fact]
    public void Offload_frees_the_inputs_on_the_device_and_reuses_pinned_buffers()
    {
        if (!TestDevice.IsCuda) return; // CUDA only (LORAHUB_TEST_DEVICE=cuda); on the CPU offload is a no-op (above)
        using var scope = NewDisposeScope();
        const int width = 1024, rows = 2048; // 8 MiB per input
        const long inputBytes = (long)width * rows * 4;
        var layers = MakeLayers(width);
        var x = randn([rows, width], device: Dev);

        (long device, long host, long allocated) Forward(bool offload, out Tensor y)
        {
            torchx.cuda.synchronize();
            var before = torchx.utils.checkpoint_offload_stats();
            var allocatedBefore = torchx.cuda.memory_allocated();
            y = Stack(layers, x.detach().requires_grad_(true), offload);
            torchx.cuda.synchronize();
            var after = torchx.utils.checkpoint_offload_stats();
            return (after.DeviceBytes - before.DeviceBytes, after.HostBytes - before.HostBytes, torchx.cuda.memory_allocated() - allocatedBefore);
        }

        var plain = Forward(false, out var y1);
        Assert.Equal(Layers * inputBytes, plain.device);
        Assert.Equal(0, plain.host);
        using (var l = y1.pow(2).sum()) l.backward();
        y1.Dispose();

        var off = Forward(true, out var y2);
        // At most the last two copies' sources are still held (freed once their completion is seen); the rest is on the host.
        Assert.InRange(off.device, 0, 2 * inputBytes);
        Assert.Equal(Layers * inputBytes, off.host);
        if (torchx.cuda.memory_stats_exact)
            // The first input is x's own memory either way; of the other five, at most two are still on the device
            // (one input of slack for the allocator).
            Assert.True(off.allocated <= plain.allocated - (Layers - 4) * inputBytes,
                $"device memory after forward: {off.allocated >> 20} MiB with offload, {plain.allocated >> 20} MiB without");
        using (var l = y2.pow(2).sum()) l.backward();
        y2.Dispose();
        var reserved = torchx.utils.checkpoint_offload_stats().PinnedReservedBytes;
        Assert.True(reserved >= Layers * inputBytes);

        // A second step rents the same pinned buffers: no new pinned memory.
        var again = Forward(true, out var y3);
        Assert.Equal(Layers * inputBytes, again.host);
        Assert.Equal(reserved, torchx.utils.checkpoint_offload_stats().PinnedReservedBytes);
        // A graph freed without backward hands its buffers back.
        y3.Dispose();
        Assert.Equal(0, torchx.utils.checkpoint_offload_stats().HostBytes);
        torchx.utils.empty_offload_cache();
        Assert.Equal(0, torchx.utils.checkpoint_offload_stats().PinnedReservedBytes);
        foreach (var l in layers) l.Dispose();
    }

    [Fact]
    public void Offload_of_a_non_contiguous_input_restores_its_values()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(3);
        var w = randn([8, 8], device: Dev);
        var x = randn([8, 16], device: Dev).t(); // 16 × 8, transposed view
        var a = x.detach().requires_grad_(true);
        torchx.utils.checkpoint(t => F.linear(t, w).sin(), a, offload: true).sum().backward();
        var b = x.detach().requires_grad_(true);
        F.linear(b, w).sin().sum().backward();
        Assert.True(a.grad!.allclose(b.grad!, 1e-5, 1e-6));
    }
}
