using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.QLoRA.Tests;

public class PagedAdamWTests
{
    private static readonly Device Dev = TestDevice.Current;

    // Runs a few steps of a small regression with the given optimizer factory; returns the final parameters. Every run
    // starts from the same values: torchx.manual_seed also seeds the CUDA generator, which TorchSharp's manual_seed leaves
    // running (two CUDA runs would start from different parameters).
    private static List<Tensor> Train(Func<List<Tensor>, Optimizer> make, Action<Optimizer>? check = null)
    {
        torchx.manual_seed(0);
        var ps = new List<Tensor> { torch.randn([300, 400], device: Dev).requires_grad_(), torch.randn([7, 3], device: Dev).requires_grad_() };
        using var optimizer = make(ps);
        for (var step = 0; step < 5; step++)
        {
            using var scope = torch.NewDisposeScope();
            optimizer.zero_grad();
            var loss = ps[0].pow(2).mean() + ps[1].sin().sum();
            loss.backward();
            optimizer.step();
        }
        check?.Invoke(optimizer);
        return ps;
    }

    [Fact]
    public void Updates_equal_adamw_and_state_is_paged_only_on_cuda()
    {
        var reference = Train(ps => new AdamW(ps, lr: 0.01));
        var paged = Train(ps => new PagedAdamW(ps, lr: 0.01), o =>
        {
            var p = (PagedAdamW)o;
            if (TestDevice.IsCuda)
            {
                // bitsandbytes pages tensors of 1e5 values or more: the 300×400 moments, not the 7×3 ones.
                Assert.Equal(2, p.paged_buffers.Count);
                Assert.All(p.paged_buffers, b => Assert.True(UnifiedMemory.is_managed(b)));
                Assert.Equal(2L * 300 * 400 * 4, p.paged_bytes);
                Assert.True(UnifiedMemory.allocated_bytes >= p.paged_bytes);
                p.page_out();
                foreach (var b in p.paged_buffers) UnifiedMemory.prefetch(b);
                Assert.Equal(3 * 2, p.state_tensors().Count); // exp_avg, exp_avg_sq, step per parameter
            }
            else
            {
                Assert.Empty(p.paged_buffers); // CPU: ordinary state
            }
        });
        for (var i = 0; i < reference.Count; i++)
            Assert.True(paged[i].Equals(reference[i]), $"parameter {i} differs");
    }

    [Fact]
    public void Unified_memory_is_never_requested_beyond_the_free_gpu_memory()
    {
        if (!TestDevice.IsCuda)
        {
            Assert.Throws<ArgumentException>(() => UnifiedMemory.zeros([4], ScalarType.Float32, torch.CPU));
            return;
        }
        var (_, total, _) = torchx.cuda.get_device_properties(Dev.index);
        var count = UnifiedMemory.allocation_count;
        // Twice the card's memory: refused before any cudaMallocManaged call.
        var e = Assert.Throws<OutOfMemoryTorchException>(() => UnifiedMemory.zeros([total / 2], ScalarType.Float32, Dev));
        Assert.Contains("unified memory", e.Message);
        Assert.Contains("paged_optimizer", e.Message);
        Assert.Equal(count, UnifiedMemory.allocation_count);

        using var small = UnifiedMemory.zeros([1000, 10], ScalarType.Float32, Dev);
        Assert.True(UnifiedMemory.is_managed(small));
        using (var values = small.to_tensor()) Assert.Equal(0.0, values.abs().sum().ToDouble());
        Assert.Equal(count + 1, UnifiedMemory.allocation_count);
        small.Dispose();
        Assert.Equal(count, UnifiedMemory.allocation_count);
    }
}
