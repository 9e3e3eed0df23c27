using LoRAHub.Distributed;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Training.Parallel;

/// <summary>Broadcasts parameter values from one rank to all, flattened into buckets of one dtype.</summary>
internal static class ParameterBroadcast
{
    public static void Run(ProcessGroup group, IReadOnlyList<Tensor> parameters, int src, long bucketBytes)
    {
        using var noGrad = no_grad();
        foreach (var bucket in Buckets(parameters, bucketBytes))
        {
            using var scope = NewDisposeScope();
            var flat = group.Rank == src || bucket.Count > 1
                ? cat(bucket.Select(p => p.detach().reshape(-1)).ToArray())
                : bucket[0].detach().reshape(-1).contiguous();
            group.broadcast(flat, src);
            if (group.Rank == src) continue;
            long offset = 0;
            foreach (var p in bucket)
            {
                p.detach().copy_(flat.narrow(0, offset, p.numel()).view_as(p));
                offset += p.numel();
            }
        }
    }

    /// <summary>Consecutive parameters of one dtype, at most <paramref name="bucketBytes"/> per bucket (one larger parameter alone).</summary>
    public static IEnumerable<List<Tensor>> Buckets(IEnumerable<Tensor> parameters, long bucketBytes)
    {
        var current = new List<Tensor>();
        long bytes = 0;
        foreach (var p in parameters)
        {
            var size = p.numel() * p.element_size();
            if (current.Count > 0 && (bytes + size > bucketBytes || p.dtype != current[0].dtype))
            {
                yield return current;
                current = new List<Tensor>();
                bytes = 0;
            }
            current.Add(p);
            bytes += size;
        }
        if (current.Count > 0) yield return current;
    }
}
