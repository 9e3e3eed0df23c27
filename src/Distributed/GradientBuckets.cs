using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Distributed;

/// <summary>
/// All-reduces the gradients of a fixed list of parameters in flattened buckets (PyTorch DDP's bucketing, default
/// 25 MB): each bucket's gradients are copied into one flat buffer, reduced with one collective, and copied back, so a
/// model with hundreds of small LoRA tensors costs a handful of collectives. Buckets hold one dtype each and follow the
/// reverse parameter order (the order backward produces gradients). A parameter whose gradient is missing on this rank
/// (unused this step) contributes zeros, so every rank issues the same collectives.
/// TorchSharp 0.107 exposes no per-tensor gradient hooks, so the buckets are reduced right after backward, not during
/// it; on NCCL they are enqueued back to back on the compute stream with no host sync in between.
/// </summary>
public sealed class GradientBuckets
{
    public const long DefaultBucketBytes = 25L * 1024 * 1024;
    private readonly ProcessGroup group;
    private readonly List<List<Tensor>> buckets = new();

    public GradientBuckets(ProcessGroup group, IEnumerable<Tensor> parameters, long bucketBytes = DefaultBucketBytes)
    {
        this.group = group;
        var current = new List<Tensor>();
        long bytes = 0;
        ScalarType? type = null;
        foreach (var p in parameters.Reverse())
        {
            var size = p.numel() * p.element_size();
            if (current.Count > 0 && (bytes + size > bucketBytes || p.dtype != type))
            {
                buckets.Add(current);
                current = new List<Tensor>();
                bytes = 0;
            }
            current.Add(p);
            bytes += size;
            type = p.dtype;
        }
        if (current.Count > 0) buckets.Add(current);
    }

    public int BucketCount => buckets.Count;

    /// <summary>
    /// Reduces every gradient across ranks (sum), then multiplies by <paramref name="scale"/> (1/WorldSize for a mean;
    /// 1 when the loss was already divided by a global count).
    /// </summary>
    public void all_reduce(double scale = 1.0)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        foreach (var bucket in buckets)
        {
            var flats = new Tensor[bucket.Count];
            for (var i = 0; i < bucket.Count; i++)
            {
                var p = bucket[i];
                if (p.grad is null) p.grad = zeros_like(p).DetachFromDisposeScope();
                flats[i] = p.grad!.reshape(-1);
            }
            var flat = bucket.Count == 1 ? flats[0].contiguous() : cat(flats);
            group.all_reduce(flat);
            if (scale != 1.0) flat.mul_(scale);
            long offset = 0;
            foreach (var p in bucket)
            {
                var n = p.numel();
                var grad = p.grad!;
                // A single contiguous gradient was reduced in place already (its reshape is a view).
                if (!(bucket.Count == 1 && grad.is_contiguous())) grad.copy_(flat.narrow(0, offset, n).view_as(grad));
                offset += n;
            }
        }
    }
}
