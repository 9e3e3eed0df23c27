namespace LoRAHub.Distributed.Tests;

/// <summary>
/// The overlapped bucket schedule in process, on a stand-in group that doubles each all-reduced tensor (two equal ranks)
/// and records the sizes it reduced, in order.
/// </summary>
// GradientBuckets.Launches counts process-wide: nothing else may start buckets meanwhile.
[Collection(RanksCollection.Name)]
public sealed class GradientBucketsTests
{
    private sealed class DoublingGroup() : ProcessGroup(new DistributedEnvironment(0, 2, 0, 2, DistributedEnvironment.DefaultMasterAddr, 1), TimeSpan.FromSeconds(5))
    {
        public readonly List<long> Reduced = new();
        public override string Backend => "test";
        protected override DeviceType TensorDevice => DeviceType.CPU;
        public override void ThrowIfFailed() { }

        protected override void AllReduce(Tensor tensor, ReduceOp op)
        {
            Reduced.Add(tensor.numel());
            tensor.mul_(2);
        }

        protected override void Broadcast(Tensor tensor, int src) => throw new NotSupportedException();
        protected override void AllGather(Tensor output, Tensor input) => throw new NotSupportedException();
        protected override void ReduceScatter(Tensor output, Tensor input, ReduceOp op) => throw new NotSupportedException();
        protected override void Barrier() { }
        public override void Dispose() { }
    }

    private static Tensor Param(int n) => zeros(n).requires_grad_(true);

    private static float[] Grad(Tensor p) => p.grad!.data<float>().ToArray();

    [Fact]
    public void Buckets_start_in_stage_order_only_once_their_gradients_are_defined_and_set_aside_gradients_are_added_back()
    {
        using var group = new DoublingGroup();
        Tensor a = Param(2), b = Param(3), c = Param(4); // a: stage 0 (the last layer), b: stage 1, c: only after backward
        var buckets = new GradientBuckets(group, [[a], [b]], [c], bucketBytes: 8); // one parameter per bucket
        Assert.Equal(3, buckets.BucketCount);
        a.grad = full(2, 1f);  // an earlier micro-batch's gradients: set aside, added back
        c.grad = full(4, 5f);
        var before = GradientBuckets.Launches;

        buckets.prepare_for_backward();
        Assert.Null(a.grad);
        b.grad = full(3, 7f);       // b is complete before a is: it must still wait for a's bucket (order)
        buckets.stage_completed(1);
        Assert.Empty(group.Reduced);
        a.grad = full(2, 2f);
        buckets.stage_completed(0); // a's bucket starts; b's stage 1 is not reached yet
        Assert.Equal([2L], group.Reduced);
        buckets.stage_completed(1);
        Assert.Equal([2L, 3L], group.Reduced);
        buckets.finish(scale: 0.5); // c (no gradient this backward: its set-aside one) after backward
        Assert.Equal([2L, 3L, 4L], group.Reduced);

        Assert.Equal([3f, 3f], Grad(a)); // (2 + 1) × 2 ranks × 0.5
        Assert.Equal([7f, 7f, 7f], Grad(b));
        Assert.Equal([5f, 5f, 5f, 5f], Grad(c));
        var after = GradientBuckets.Launches;
        Assert.Equal(2, after.InBackward - before.InBackward);
        Assert.Equal(1, after.AfterBackward - before.AfterBackward);
    }

    [Fact]
    public void Without_prepare_finish_reduces_everything_after_backward_and_missing_gradients_count_as_zeros()
    {
        using var group = new DoublingGroup();
        Tensor a = Param(2), b = Param(3);
        var buckets = new GradientBuckets(group, [a, b], bucketBytes: 1 << 20);
        a.grad = full(2, 1.5f);
        buckets.stage_completed(0); // not armed: ignored
        Assert.Empty(group.Reduced);
        buckets.finish();
        Assert.Equal([5L], group.Reduced); // one bucket, b's zeros included
        Assert.Equal([3f, 3f], Grad(a));
        Assert.Equal([0f, 0f, 0f], Grad(b));
    }
}
