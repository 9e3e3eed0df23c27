using LoRAHub.Abstractions;
using LoRAHub.Distributed;
using LoRAHub.TorchExtensions;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Training.Parallel;

/// <summary>
/// Data parallelism's gradient all-reduce, overlapped with backward where the model marks its layers (PyTorch DDP's
/// reducer). TorchSharp 0.107 has no per-parameter gradient hooks, so the sync points are the layers' inputs: on a
/// model that implements <see cref="ILayerInputHook"/>, forward passes each layer's input through an identity autograd
/// function whose backward runs once the layer's backward is done. By then the layer's parameter gradients are complete:
/// libtorch's ready queue runs AccumulateGrad nodes first (sequence_nr UINT64_MAX, the highest priority), and whatever
/// the order, a bucket starts only when all its gradients are defined (see <see cref="GradientBuckets"/>). The buckets
/// that are ready start on the communication stream there; the rest after backward. Gradient accumulation overlaps only
/// the micro-batch whose backward ends the step (DDP's no_sync for the others).
/// LORAHUB_DDP_OVERLAP=0 turns overlap off (every bucket after backward), e.g. to measure both.
/// </summary>
public sealed class GradientSync : IDisposable
{
    private readonly GradientBuckets buckets;
    private readonly ILayerInputHook? hooks;
    private readonly SparseEmbeddingGradient? sparse;
    private readonly int points;
    private volatile bool armed;
    private long generation;

    /// <param name="overlap">null: on unless LORAHUB_DDP_OVERLAP=0.</param>
    public GradientSync(ProcessGroup group, ICausalLanguageModel model, IReadOnlyList<Tensor> trainable, long bucketBytes = GradientBuckets.DefaultBucketBytes,
        bool? overlap = null)
    {
        overlap ??= Environment.GetEnvironmentVariable("LORAHUB_DDP_OVERLAP") != "0";
        hooks = overlap.Value ? model as ILayerInputHook : null;
        if (hooks is null)
        {
            buckets = new GradientBuckets(group, trainable, bucketBytes);
            return;
        }
        if (hooks.LayerInputHook is not null)
            throw new InvalidOperationException("the model's LayerInputHook is already set: another data-parallel trainer is using this model; dispose it first");
        var layers = hooks.HookedLayers;
        points = layers.Count;
        // Each trainable parameter goes to the stage of the one layer that holds it; in none, or in several: after backward.
        var index = new Dictionary<(IntPtr, long, ScalarType), int>();
        for (var i = 0; i < trainable.Count; i++)
            if (trainable[i].numel() > 0) index[Key(trainable[i])] = i;
        var stageOf = new int?[trainable.Count];
        var shared = new bool[trainable.Count];
        for (var layer = 0; layer < points; layer++)
        {
            var stage = points - 1 - layer; // backward completes the last layer first
            foreach (var module in layers[layer])
            foreach (var p in module.parameters())
            {
                if (!p.requires_grad || !index.TryGetValue(Key(p), out var i)) continue;
                if (stageOf[i] is int s && s != stage) shared[i] = true;
                stageOf[i] = stage;
            }
        }
        var stages = Enumerable.Range(0, points).Select(_ => new List<Tensor>()).ToArray();
        var rest = new List<Tensor>();
        // The embedding table's lookup gradient as rows (SparseEmbeddingGradient): its dense part, where tied, is the
        // head's, complete at the head's sync point (stage 0); untied it has none and is no bucket's.
        var table = SparseEmbeddings && model is IEmbeddingLookupHook e && e.EmbeddingTable is { requires_grad: true } t
            && index.TryGetValue(Key(t), out var ti) && stageOf[ti] is null ? (e, t, ti) : default;
        for (var i = 0; i < trainable.Count; i++)
            if (table.e is not null && i == table.ti)
            {
                if (table.e.EmbeddingTiedToHead) stages[0].Add(trainable[i]);
            }
            else if (stageOf[i] is int s && !shared[i]) stages[s].Add(trainable[i]);
            else rest.Add(trainable[i]);
        buckets = new GradientBuckets(group, stages, rest, bucketBytes);
        if (table.e is not null) sparse = new SparseEmbeddingGradient(group, table.e, trainable[table.ti]);
        hooks.LayerInputHook = OnLayerInput;
    }

    /// <summary>
    /// Whether an overlapped sync takes a trainable embedding table's lookup gradient as rows (token ids and gradient rows,
    /// gathered after backward: <see cref="SparseEmbeddingGradient"/>) instead of all-reducing the dense table after
    /// backward; a tied table's dense (head) part then starts at the head's sync point. LORAHUB_DDP_SPARSE_EMBEDDING=1
    /// turns it on (default off until measured on NCCL).
    /// </summary>
    public static bool SparseEmbeddings { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_DDP_SPARSE_EMBEDDING")?.Trim() == "1";

    /// <summary>True when buckets start during backward (the model has sync points and overlap is on).</summary>
    public bool Overlapped => hooks is not null;

    public int BucketCount => buckets.BucketCount;

    /// <summary>True when the embedding table's lookup gradient is exchanged as rows (<see cref="SparseEmbeddings"/> took effect).</summary>
    public bool SparseEmbedding => sparse is not null;

    // Tensors are compared by storage (TorchSharp may hand out several wrappers of one parameter).
    private static (IntPtr, long, ScalarType) Key(Tensor t) => (torchx.data_ptr(t), t.numel(), t.dtype);

    /// <summary>
    /// Call before the forward of the micro-batch whose backward ends the step (the last with target tokens): its
    /// backward starts buckets as layers finish. Without overlap, nothing.
    /// </summary>
    public void prepare_for_backward()
    {
        if (hooks is null) return;
        buckets.prepare_for_backward();
        Interlocked.Increment(ref generation);
        armed = true;
    }

    /// <summary>After backward: every rank holds the sum of the ranks' gradients times <paramref name="scale"/>.</summary>
    public void finish(double scale = 1.0)
    {
        armed = false;
        buckets.finish(scale);
        sparse?.Finish(scale);
    }

    /// <summary>After a failure between <see cref="prepare_for_backward"/> and <see cref="finish"/>: drops the reduction in progress.</summary>
    public void reset()
    {
        armed = false;
        buckets.reset();
        sparse?.Reset();
    }

    private Tensor OnLayerInput(int layer, Tensor x)
    {
        if (!armed || !x.requires_grad || !is_grad_enabled() || layer < 0 || layer >= points) return x;
        var stage = points - 1 - layer;
        var at = Interlocked.Read(ref generation);
        return new SyncPoint(() =>
        {
            // A graph of an earlier step (or a forward without backward) must not start this step's buckets.
            if (armed && Interlocked.Read(ref generation) == at) buckets.stage_completed(stage);
        }).apply(x)[0];
    }

    /// <summary>Removes the hook from the model.</summary>
    public void Dispose()
    {
        if (hooks is not null && hooks.LayerInputHook == OnLayerInput) hooks.LayerInputHook = null;
        reset();
        sparse?.Dispose();
    }

    /// <summary>The identity whose backward tells the buckets that a layer's gradients are complete.</summary>
    private sealed class SyncPoint(Action reached) : CustomFunction
    {
        protected override string name => "data-parallel gradient sync point";

        // A new tensor on the same storage (no copy); not a view, so the layer may use it as any input.
        protected override Tensor[] forward(Tensor?[] inputs) => [inputs[0]!.detach()];

        protected override Tensor?[] backward(Tensor[] grad_outputs)
        {
            reached();
            return [grad_outputs[0].detach()];
        }
    }
}
