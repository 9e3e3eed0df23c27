using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Distributed;

/// <summary>
/// All-reduces the gradients of a fixed list of parameters in flattened buckets (PyTorch DDP's bucketing, default
/// 25 MB): each bucket's gradients are copied into one flat buffer, reduced with one collective, and copied back, so a
/// model with hundreds of small LoRA tensors costs a handful of collectives. Buckets hold one dtype each and follow the
/// order backward completes gradients. A parameter whose gradient is missing on this rank (unused this step)
/// contributes zeros, so every rank issues the same collectives, in the same order.
/// <para>
/// Two ways to run: <see cref="all_reduce"/> after backward; or overlapped with backward (DDP's reducer):
/// <see cref="prepare_for_backward"/> before it, <see cref="stage_completed"/> from inside it each time a stage of
/// parameters is complete (the trainer learns this from an identity autograd function on each layer's input), which
/// starts the buckets that are then ready on the communication stream, and <see cref="finish"/> after it, which starts
/// the rest and waits for all. Buckets start strictly in order, so ranks that see stages complete at different times
/// still issue the same collectives in the same order; a bucket starts only once every gradient in it is defined, which
/// <see cref="prepare_for_backward"/> makes a sign of completion by setting gradients aside first (they are added back).
/// </para>
/// </summary>
public sealed class GradientBuckets
{
    public const long DefaultBucketBytes = 25L * 1024 * 1024;
    private static long launchedInBackward, launchedAfterBackward;
    private readonly ProcessGroup group;
    private readonly List<Bucket> buckets = new();
    private readonly Dictionary<Tensor, Tensor> setAside = new(ReferenceEqualityComparer.Instance);
    private int next;
    private bool active;

    private sealed class Bucket(List<Tensor> parameters, int stage)
    {
        public readonly List<Tensor> Parameters = parameters;
        /// <summary>The stage after which every gradient in the bucket is complete; int.MaxValue: only when backward ends.</summary>
        public readonly int Stage = stage;
        public Tensor? Flat;
        public Work? Work;
    }

    /// <summary>Buckets in reverse parameter order (the order backward produces gradients), reduced after backward.</summary>
    public GradientBuckets(ProcessGroup group, IEnumerable<Tensor> parameters, long bucketBytes = DefaultBucketBytes)
        : this(group, [], parameters, bucketBytes)
    {
    }

    /// <summary>
    /// Buckets for overlapping: <paramref name="stages"/>[s] holds the parameters whose gradients are complete when stage
    /// s of backward is (stages in the order backward completes them: the last layer first); <paramref name="rest"/>
    /// those complete only when backward ends. Each is bucketed in reverse of the order given.
    /// </summary>
    public GradientBuckets(ProcessGroup group, IReadOnlyList<IReadOnlyList<Tensor>> stages, IEnumerable<Tensor> rest, long bucketBytes = DefaultBucketBytes)
    {
        if (bucketBytes <= 0) throw new ArgumentOutOfRangeException(nameof(bucketBytes), "the bucket size must be positive (bytes)");
        this.group = group;
        var current = new List<Tensor>();
        long bytes = 0;
        ScalarType? type = null;
        var stage = -1;
        var ordered = stages.SelectMany((ps, s) => ps.Reverse().Select(p => (p, s))).Concat(rest.Reverse().Select(p => (p, s: int.MaxValue)));
        foreach (var (p, s) in ordered)
        {
            var size = p.numel() * p.element_size();
            if (current.Count > 0 && (bytes + size > bucketBytes || p.dtype != type))
            {
                buckets.Add(new Bucket(current, stage));
                current = new List<Tensor>();
                bytes = 0;
            }
            current.Add(p);
            bytes += size;
            type = p.dtype;
            stage = s; // stages only grow along the order: the bucket is complete at its last parameter's stage
        }
        if (current.Count > 0) buckets.Add(new Bucket(current, stage));
    }

    public int BucketCount => buckets.Count;

    /// <summary>Buckets started from inside backward, and after it, by every instance of this process (for tests and reports).</summary>
    public static (long InBackward, long AfterBackward) Launches => (Interlocked.Read(ref launchedInBackward), Interlocked.Read(ref launchedAfterBackward));

    /// <summary>
    /// Reduces every gradient across ranks (sum), then multiplies by <paramref name="scale"/> (1/WorldSize for a mean;
    /// 1 when the loss was already divided by a global count). After backward, without overlap.
    /// </summary>
    public void all_reduce(double scale = 1.0)
    {
        if (active) throw new InvalidOperationException("an overlapped backward is in progress: end it with finish()");
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        foreach (var bucket in buckets)
        {
            var flat = Flatten(bucket);
            group.all_reduce(flat);
            if (scale != 1.0) flat.mul_(scale);
            Unflatten(bucket, flat);
        }
    }

    /// <summary>
    /// Starts an overlapped reduction: the gradients accumulated so far (earlier micro-batches) are set aside, so that a
    /// defined gradient means this backward completed it; they are added back before reducing. Call before the forward
    /// of the micro-batch whose backward ends the step.
    /// </summary>
    public void prepare_for_backward()
    {
        if (active) throw new InvalidOperationException("prepare_for_backward was called twice without finish()");
        foreach (var p in buckets.SelectMany(b => b.Parameters))
            if (p.grad is { } g)
            {
                setAside[p] = g.DetachFromDisposeScope();
                p.grad = null;
            }
        next = 0;
        active = true;
    }

    /// <summary>
    /// From inside backward: stages up to <paramref name="stage"/> are complete. Starts, in order, each next bucket whose
    /// stage is complete and whose gradients are all defined; stops at the first that is not.
    /// </summary>
    public void stage_completed(int stage)
    {
        if (!active) return;
        using var noGrad = no_grad();
        while (next < buckets.Count && buckets[next].Stage <= stage && AllDefined(buckets[next]))
        {
            Launch(buckets[next++]);
            Interlocked.Increment(ref launchedInBackward);
        }
    }

    /// <summary>
    /// After backward: starts the buckets not started yet (missing gradients count as zeros), waits for all, copies the
    /// sums (times <paramref name="scale"/>) back into the gradients. Without <see cref="prepare_for_backward"/> this is
    /// <see cref="all_reduce"/>.
    /// </summary>
    public void finish(double scale = 1.0)
    {
        if (!active)
        {
            all_reduce(scale);
            return;
        }
        try
        {
            using var noGrad = no_grad();
            for (; next < buckets.Count; next++)
            {
                Launch(buckets[next]);
                Interlocked.Increment(ref launchedAfterBackward);
            }
            using var scope = NewDisposeScope();
            foreach (var bucket in buckets)
            {
                bucket.Work!.wait();
                bucket.Work = null;
                if (scale != 1.0) bucket.Flat!.mul_(scale);
                Unflatten(bucket, bucket.Flat!);
            }
        }
        finally
        {
            Release();
        }
    }

    /// <summary>
    /// Ends an overlapped reduction that failed part-way (an exception in forward or backward): waits for what was
    /// started, frees its buffers and drops the set-aside gradients. The gradients are then not usable for a step.
    /// </summary>
    public void reset()
    {
        if (active) Release();
    }

    // Frees the flat buffers once the compute stream is ordered after their collectives (so the allocator cannot hand
    // their memory to compute while a collective still writes it), and the set-aside gradients.
    private void Release()
    {
        foreach (var b in buckets)
        {
            try { b.Work?.wait(); }
            catch (Exception e) when (e is DistributedException or ExternalException) { /* the group's failure is reported by the caller */ }
            b.Work = null;
            b.Flat?.Dispose();
            b.Flat = null;
            b.Work = null;
        }
        foreach (var g in setAside.Values) g.Dispose();
        setAside.Clear();
        active = false;
    }

    private static bool AllDefined(Bucket bucket)
    {
        foreach (var p in bucket.Parameters)
        {
            using var g = p.grad;
            if (g is null) return false;
        }
        return true;
    }

    // Adds back the set-aside gradients (g_new + g_old: the same sum, bit for bit, as accumulating in backward), flattens
    // and starts the bucket; the flat buffer lives until finish.
    private void Launch(Bucket bucket)
    {
        foreach (var p in bucket.Parameters)
        {
            if (!setAside.Remove(p, out var old)) continue;
            using var g = p.grad;
            if (g is null)
            {
                p.grad = old;
                old.Dispose();
                continue;
            }
            g.add_(old);
            old.Dispose();
        }
        using var scope = NewDisposeScope();
        bucket.Flat = Flatten(bucket).DetachFromDisposeScope();
        bucket.Work = group.all_reduce_async(bucket.Flat);
    }

    // One contiguous buffer of the bucket's gradients (a missing one as zeros); a single contiguous gradient is its own
    // buffer (its reshape is a view, reduced in place).
    private static Tensor Flatten(Bucket bucket)
    {
        var flats = new Tensor[bucket.Parameters.Count];
        for (var i = 0; i < flats.Length; i++)
        {
            var p = bucket.Parameters[i];
            if (p.grad is null) p.grad = zeros_like(p).DetachFromDisposeScope();
            flats[i] = p.grad!.reshape(-1);
        }
        return flats.Length == 1 ? flats[0].contiguous() : cat(flats);
    }

    private static void Unflatten(Bucket bucket, Tensor flat)
    {
        long offset = 0;
        foreach (var p in bucket.Parameters)
        {
            var n = p.numel();
            using var grad = p.grad!;
            if (!(bucket.Parameters.Count == 1 && grad.is_contiguous())) grad.copy_(flat.narrow(0, offset, n).view_as(grad));
            offset += n;
        }
    }
}
