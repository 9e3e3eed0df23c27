using System.Diagnostics;

namespace LoRAHub.TorchExtensions.Tests;

using F = torch.nn.functional;

/// <summary>
/// Dispose scopes free a training step's temporaries, including those our autograd functions make in backward (which
/// runs outside the caller's scope): thousands of steps leave the live-tensor count and native memory flat.
/// Runs alone: the live-tensor count and resident memory are process-wide.
/// </summary>
[Collection(Serial.Name)]
public class MemoryTests
{
    private static readonly Device Dev = TestDevice.Current;

    private static void Settle()
    {
        for (var i = 0; i < 3; i++)
        {
            GC.Collect();
            GC.WaitForPendingFinalizers();
        }
    }

    [Fact]
    public void Training_steps_through_checkpoint_and_chunked_cross_entropy_keep_memory_flat()
    {
        manual_seed(0);
        using var first = nn.Linear(16, 32).to(Dev);
        using var head = nn.Linear(32, 10).to(Dev);
        var parameters = first.parameters().Concat(head.parameters()).ToList();
        using var opt = optim.AdamW(parameters, lr: 1e-3);
        var x = randn([8, 16], device: Dev).DetachFromDisposeScope();
        var y = randint(0, 10, [8], device: Dev).DetachFromDisposeScope();

        void Step()
        {
            using var scope = NewDisposeScope();
            var h = torchx.utils.checkpoint(t => F.dropout(first.forward(t).tanh(), 0.1, true), x);
            var loss = torchx.nn.functional.chunked_cross_entropy(h, head.weight!, y, chunk_size: 3);
            loss.backward();
            opt.step();
            opt.zero_grad();
        }

        // One thread: tiny ops gain nothing from two, and OpenMP's spinning would only slow a busy machine.
        var threads = get_num_threads();
        set_num_threads(1);
        try
        {
            for (var i = 0; i < 1_000; i++) Step(); // warm up: allocator, optimizer state and the GC heap reach their steady size
            Settle();
            var liveBefore = torchx.LiveTensorCount;
            var rssBefore = Process.GetCurrentProcess().WorkingSet64;

            for (var i = 0; i < 3_000; i++) Step();

            Settle();
            var liveAfter = torchx.LiveTensorCount;
            var rssAfter = Process.GetCurrentProcess().WorkingSet64;
            Assert.Equal(liveBefore, liveAfter);
            // A graph or its saved tensors leaked per step would grow resident memory by far more in 3,000 steps.
            Assert.True(rssAfter - rssBefore < 32L << 20, $"resident memory grew by {(rssAfter - rssBefore) >> 20} MB");
        }
        finally
        {
            set_num_threads(threads);
        }
        x.Dispose();
        y.Dispose();
    }

    [Fact]
    public void Scopes_nest_and_moved_results_survive()
    {
        Tensor kept;
        var before = torchx.LiveTensorCount;
        using (var outer = NewDisposeScope())
        {
            using (NewDisposeScope())
            {
                var a = ones(3);
                kept = (a * 2).MoveToOuterDisposeScope();
            }
            Assert.False(kept.IsInvalid);
            Assert.Equal(6f, kept.sum().item<float>());
        }
        Assert.True(kept.IsInvalid);
        Assert.Equal(before, torchx.LiveTensorCount);
    }

    [Fact]
    public void Cuda_memory_statistics_follow_allocations()
    {
        if (!TestDevice.IsCuda) return; // CUDA only (LORAHUB_TEST_DEVICE=cuda)
        torchx.cuda.empty_cache();
        torchx.cuda.reset_peak_memory_stats();
        var before = torchx.cuda.memory_allocated();
        var reservedBefore = torchx.cuda.memory_reserved();
        var (name, total, free) = torchx.cuda.get_device_properties();
        Assert.False(string.IsNullOrWhiteSpace(name));
        Assert.InRange(free, 1, total);
        using (var big = empty([256L << 20], ScalarType.Byte, Dev)) // 256 MiB
        {
            big.fill_(1);
            torchx.cuda.synchronize();
            // Exact (cudaMallocAsync): the pool's used bytes grew by the tensor. Otherwise the device's used memory holds it.
            var grown = torchx.cuda.memory_stats_exact ? torchx.cuda.memory_allocated() - before : torchx.cuda.memory_allocated();
            Assert.True(grown >= 256L << 20, $"{grown} bytes");
            Assert.True(torchx.cuda.memory_reserved() >= torchx.cuda.memory_allocated() || !torchx.cuda.memory_stats_exact);
        }
        torchx.cuda.synchronize();
        Assert.True(torchx.cuda.max_memory_allocated() - (torchx.cuda.memory_stats_exact ? before : 0) >= 256L << 20);
        if (torchx.cuda.memory_stats_exact)
        {
            // cudaMallocAsync: freed memory leaves "allocated" at once; the peak stays until reset.
            Assert.True(torchx.cuda.memory_allocated() - before < 16L << 20);
            torchx.cuda.reset_peak_memory_stats();
            Assert.True(torchx.cuda.max_memory_allocated() - before < 16L << 20);
            torchx.cuda.empty_cache();
            Assert.True(torchx.cuda.memory_reserved() <= reservedBefore + (16L << 20));
        }
    }
}
