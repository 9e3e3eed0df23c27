using System.Diagnostics;
using LoRAHub.Torch.NN;
using LoRAHub.Torch.Optim;

namespace LoRAHub.Torch.Tests;

/// <summary>Runs alone: the live-tensor count is process-wide, so parallel tests would disturb it.</summary>
[CollectionDefinition(nameof(MemoryTests), DisableParallelization = true)]
public sealed class MemoryTestsCollection;

/// <summary>Dispose scopes free a training step's temporaries: 10,000 steps leave native memory flat.</summary>
[Collection(nameof(MemoryTests))]
public class MemoryTests
{
    private static readonly Device Dev = TestDevice.Current;

    [Fact]
    public void Ten_thousand_training_steps_keep_native_memory_flat()
    {
        torch.manual_seed(0);
        using var model = new Sequential(new Linear(16, 32), new Linear(32, 4));
        model.to(Dev);
        using var opt = new AdamW(model.parameters(), lr: 1e-3);
        var x = torch.randn([8, 16], device: Dev).DetachFromDisposeScope();
        var y = torch.randn([8, 4], device: Dev).DetachFromDisposeScope();

        void Step()
        {
            using var scope = torch.NewDisposeScope();
            var loss = torch.nn.functional.mse_loss(model.forward(x), y);
            loss.backward();
            opt.step();
            opt.zero_grad();
        }

        for (var i = 0; i < 200; i++) Step(); // warm up allocator and optimizer state
        GC.Collect();
        GC.WaitForPendingFinalizers();
        var liveBefore = torch.LiveTensorCount;
        var rssBefore = Process.GetCurrentProcess().WorkingSet64;

        for (var i = 0; i < 10_000; i++) Step();

        var liveAfter = torch.LiveTensorCount;
        var rssAfter = Process.GetCurrentProcess().WorkingSet64;
        Assert.Equal(liveBefore, liveAfter);
        // Scopes free eagerly, so resident memory must not grow with the step count (10k leaked steps would be >100 MB).
        Assert.True(rssAfter - rssBefore < 32L << 20, $"resident memory grew by {(rssAfter - rssBefore) >> 20} MB");
        x.Dispose();
        y.Dispose();
    }

    [Fact]
    public void Scopes_nest_and_moved_results_survive()
    {
        Tensor kept;
        var before = torch.LiveTensorCount;
        using (var outer = torch.NewDisposeScope())
        {
            using (torch.NewDisposeScope())
            {
                var a = torch.ones(3);
                kept = (a * 2).MoveToOuterDisposeScope();
            }
            Assert.False(kept.IsInvalid);
            Assert.Equal(6f, kept.sum().item<float>());
        }
        Assert.True(kept.IsInvalid);
        Assert.Equal(before, torch.LiveTensorCount);
    }

    [Fact]
    public void Detached_tensors_outlive_scopes()
    {
        Tensor owned;
        using (torch.NewDisposeScope()) owned = torch.ones(2).DetachFromDisposeScope();
        Assert.False(owned.IsInvalid);
        owned.Dispose();
    }
}
