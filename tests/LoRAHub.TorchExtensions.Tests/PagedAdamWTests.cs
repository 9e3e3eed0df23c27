using LoRAHub.TorchExtensions.Cuda;
using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// PagedAdamW: the same updates as AdamW, with large moments in CUDA unified memory on a GPU (ordinary tensors on CPU),
/// checkpoints through copies, and unified memory never requested beyond the GPU's free memory.
/// </summary>
[Collection(KernelTestsCollection.Name)]
public class PagedAdamWTests
{
    private static readonly Device Dev = TestDevice.Current;
    private static readonly Device Cuda = new(DeviceType.CUDA, 0);

    // Runs a few steps of a small regression with the given optimizer factory; returns the final parameters. Every run
    // starts from the same values: torchx.manual_seed also seeds the CUDA generator, which TorchSharp's manual_seed leaves
    // running (two CUDA runs would start from different parameters).
    private static List<Tensor> Train(Device device, Func<List<Tensor>, Optimizer> make, Action<Optimizer>? check = null)
    {
        torchx.manual_seed(0);
        var ps = new List<Tensor> { randn([300, 400], device: device).requires_grad_(), randn([7, 3], device: device).requires_grad_() };
        using var optimizer = make(ps);
        for (var step = 0; step < 5; step++)
        {
            using var scope = NewDisposeScope();
            optimizer.zero_grad();
            var loss = ps[0].pow(2).mean() + ps[1].sin().sum();
            loss.backward();
            optimizer.step();
        }
        check?.Invoke(optimizer);
        return ps;
    }

    [Fact]
    public void Updates_equal_adamw_and_state_is_ordinary_off_cuda()
    {
        var reference = Train(CPU, ps => new AdamW(ps, lr: 0.01));
        var paged = Train(CPU, ps => new PagedAdamW(ps, lr: 0.01), o =>
        {
            var p = (PagedAdamW)o;
            Assert.Empty(p.paged_buffers); // CPU: ordinary state
            Assert.Equal(0, p.paged_bytes);
            Assert.Equal(3 * 2, p.state_tensors().Count);
        });
        for (var i = 0; i < reference.Count; i++)
            Assert.True(Exact.Equal(paged[i], reference[i]), $"parameter {i} differs");
    }

    [Fact]
    public void Unified_memory_is_cuda_memory()
    {
        Assert.Throws<ArgumentException>(() => UnifiedMemory.zeros([4], ScalarType.Float32, CPU));
        using var t = ones(3);
        Assert.False(UnifiedMemory.is_managed(t));
    }

    [Fact]
    public void On_cuda_large_state_is_paged_and_updates_equal_adamw()
    {
        if (!cuda.is_available()) return;
        Assert.True(CudaKernels.Available, $"CUDA is available but LoRAHub's kernels are not: {CudaKernels.UnavailableReason}");
        var reference = Train(Cuda, ps => new AdamW(ps, lr: 0.01));
        var bytesBefore = UnifiedMemory.allocated_bytes;
        var paged = Train(Cuda, ps => new PagedAdamW(ps, lr: 0.01), o =>
        {
            var p = (PagedAdamW)o;
            // bitsandbytes pages tensors of 1e5 values or more: the 300×400 moments, not the 7×3 ones.
            Assert.Equal(2, p.paged_buffers.Count);
            Assert.All(p.paged_buffers, b => Assert.True(UnifiedMemory.is_managed(b)));
            Assert.Equal(2L * 300 * 400 * 4, p.paged_bytes);
            Assert.True(UnifiedMemory.allocated_bytes - bytesBefore >= p.paged_bytes);
            p.page_out();
            foreach (var b in p.paged_buffers) UnifiedMemory.prefetch(b);
            var state = p.state_tensors();
            Assert.Equal(3 * 2, state.Count); // exp_avg, exp_avg_sq, step per parameter
            Assert.Equal(DeviceType.CUDA, state["0.0.exp_avg"].device_type);
            Assert.True(state["0.0.exp_avg_sq"].abs().sum().item<float>() > 0);
        });
        for (var i = 0; i < reference.Count; i++)
            Assert.True(Exact.Equal(paged[i], reference[i]), $"parameter {i} differs");
        Assert.Equal(bytesBefore, UnifiedMemory.allocated_bytes); // disposing the optimizer freed its unified memory
    }

    [Fact]
    public void Paged_state_round_trips_through_a_checkpoint()
    {
        if (!cuda.is_available()) return;
        using var scope = NewDisposeScope();
        torchx.manual_seed(1);
        var p = randn([400, 300], device: Cuda).requires_grad_();
        var q = p.detach().clone().requires_grad_();
        using var first = new PagedAdamW([p], lr: 0.01);
        for (var i = 0; i < 2; i++)
        {
            p.square().mean().backward();
            first.step();
            first.zero_grad();
        }
        var saved = first.state_tensors().ToDictionary(kv => kv.Key, kv => kv.Value.clone());
        using var second = new PagedAdamW([q], lr: 0.01);
        using (no_grad()) q.copy_(p);
        second.load_state_tensors(saved);
        Assert.Equal(2, second.paged_buffers.Count);
        Assert.True(Exact.Equal(second.state_tensors()["0.0.exp_avg"], saved["0.0.exp_avg"]));
        p.square().mean().backward();
        q.square().mean().backward();
        first.step();
        second.step();
        Assert.True(Exact.Equal(p, q), "a restored paged optimizer must continue exactly");
    }

    [Fact]
    public void Unified_memory_is_never_requested_beyond_the_free_gpu_memory()
    {
        if (!cuda.is_available()) return;
        var (_, total, _) = torchx.cuda.get_device_properties(0);
        var count = UnifiedMemory.allocation_count;
        // Twice the card's memory: refused before any cuMemAllocManaged call.
        var e = Assert.Throws<OutOfMemoryTorchException>(() => UnifiedMemory.zeros([total / 2], ScalarType.Float32, Cuda));
        Assert.Contains("unified memory", e.Message);
        Assert.Contains("paged_optimizer", e.Message);
        Assert.Equal(count, UnifiedMemory.allocation_count);

        using var small = UnifiedMemory.zeros([1000, 10], ScalarType.Float32, Cuda);
        Assert.True(UnifiedMemory.is_managed(small));
        using (var copy = small.to_tensor()) Assert.Equal(0.0, copy.abs().sum().item<float>());
        Assert.Equal(count + 1, UnifiedMemory.allocation_count);
        using (var values = arange(10000, ScalarType.Float32, Cuda).reshape(1000, 10))
        {
            small.copy_(values);
            using var back = small.to_tensor();
            Assert.True(Exact.Equal(back, values));
        }
        small.Dispose();
        Assert.Equal(count, UnifiedMemory.allocation_count);
    }
}
