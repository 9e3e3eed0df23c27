using System.Runtime.InteropServices;

namespace LoRAHub.TorchExtensions.Tests;

using F = torch.nn.functional;

/// <summary>
/// Dispose scopes free a training step's temporaries, including those our autograd functions make in backward (which
/// runs outside the caller's scope): thousands of steps leave the live-tensor count and the native heap flat.
/// Runs alone: the live-tensor count and the native heap are process-wide.
/// </summary>
[Collection(Serial.Name)]
public class MemoryTests
{
    private static readonly Device Dev = TestDevice.Current;

    /// <summary>
    /// Bytes malloc has handed out and not got back (glibc's mallinfo2: uordblks + hblkhd over all arenas), where libtorch's
    /// CPU tensors and autograd nodes live. Unlike resident memory it does not move with the managed heap's size.
    /// </summary>
    private static long NativeHeapInUse()
    {
        var info = mallinfo2();
        return (long)(info.uordblks + info.hblkhd);
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct MallInfo2
    {
        public nuint arena, ordblks, smblks, hblks, hblkhd, usmblks, fsmblks, uordblks, fordblks, keepcost;
    }

    [DllImport("libc", EntryPoint = "mallinfo2")]
    private static extern MallInfo2 mallinfo2();

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
        torchx.manual_seed(0);
        // Activations of 64 KB and more: one leaked per step would add hundreds of MB, far above the heap's jitter.
        using var first = nn.Linear(128, 256).to(Dev);
        using var head = nn.Linear(256, 100).to(Dev);
        var parameters = first.parameters().Concat(head.parameters()).ToList();
        using var opt = optim.AdamW(parameters, lr: 1e-3);
        var x = randn([64, 128], device: Dev).DetachFromDisposeScope();
        var y = randint(0, 100, [64], device: Dev).DetachFromDisposeScope();

        void Step()
        {
            using var scope = NewDisposeScope();
            var h = torchx.utils.checkpoint(t => F.dropout(first.forward(t).tanh(), 0.1, true), x);
            var loss = torchx.nn.functional.chunked_cross_entropy(h, head.weight!, y, chunk_size: 24);
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
            var heapBefore = NativeHeapInUse();

            for (var i = 0; i < 3_000; i++) Step();

            Settle();
            var liveAfter = torchx.LiveTensorCount;
            var heapAfter = NativeHeapInUse();
            Assert.Equal(liveBefore, liveAfter);
            // The heap moves by a few MB with the GC's timing (the runtime's own native allocations).
            Assert.True(heapAfter - heapBefore < 16L << 20, $"native heap in use grew by {(heapAfter - heapBefore) >> 10} KB");
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
