using LoRAHub.Distributed.Nccl;
using LoRAHub.Training.Parallel;

namespace LoRAHub.Distributed.Tests;

/// <summary>
/// The overlapped gradient sync on NCCL (communication stream, events, collectives started from libtorch's autograd
/// thread) in one process: a group of one rank, whose sum is the rank's own gradients, so the synced gradients must be
/// exactly those backward made. Runs where LORAHUB_TEST_DEVICE=cuda (the 2-rank NCCL checks are in
/// src/Distributed/gpu/run-ddp.sh); on the CPU it returns at once.
/// </summary>
// GradientBuckets.Launches counts process-wide: nothing else may start buckets meanwhile.
[Collection(RanksCollection.Name)]
public sealed class NcclOverlapTests
{
    private static void Backward(ICausalLanguageModel model, Tensor ids)
    {
        using var scope = NewDisposeScope();
        model.ComputeLoss(ids, ids).backward();
    }

    [Fact]
    public void Overlapped_buckets_on_the_communication_stream_give_exactly_the_accumulated_gradients()
    {
        if (Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") is not { } name || !name.StartsWith("cuda")) return;
        var device = new Device(name);
        var environment = new DistributedEnvironment(0, 1, 0, 1, DistributedEnvironment.DefaultMasterAddr, 29700 + Environment.ProcessId % 200);
        using var group = NcclProcessGroup.Create(environment, Math.Max(0, device.index), TimeSpan.FromSeconds(60));
        using var model = OverlapModels.Create("llama-untied", device);
        var trainable = model.Root.parameters().Where(p => p.requires_grad).Select(p => (Tensor)p).ToList();
        torchx.manual_seed(3);
        using var first = randint(2, 32, [4, 24], device: device);
        using var second = randint(2, 32, [4, 24], device: device);

        // Two accumulated micro-batches without any sync: what the synced gradients must equal.
        Backward(model, first);
        Backward(model, second);
        var expected = trainable.Select(p => p.grad!.clone().DetachFromDisposeScope()).ToList();
        foreach (var p in trainable) p.grad = null;

        var before = GradientBuckets.Launches;
        using (var sync = new GradientSync(group, model, trainable, bucketBytes: 4 << 10, overlap: true))
        {
            Assert.True(sync.Overlapped && sync.BucketCount > 4, $"{sync.BucketCount} buckets");
            Backward(model, first);
            sync.prepare_for_backward();
            Backward(model, second);
            sync.finish();
        }
        Assert.True(GradientBuckets.Launches.InBackward > before.InBackward, "no bucket started during backward");
        for (var i = 0; i < trainable.Count; i++)
        {
            using var grad = trainable[i].grad!;
            var diff = (grad - expected[i]).abs().max().item<float>();
            Assert.True(diff == 0, $"parameter {i}: max |Δ| {diff}");
        }
        group.barrier();
    }
}
