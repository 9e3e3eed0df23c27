using LoRAHub.Torch;
using LoRAHub.Torch.NN;

namespace LoRAHub.Plugins.DoRA;

/// <summary>
/// One adapter's DoRA state on one layer, named as PEFT's DoraLinearLayer: the trainable magnitude m (out) as its
/// "weight", so the parameter path is "&lt;layer&gt;.lora_magnitude_vector.&lt;adapter&gt;.weight". It also caches ‖W0_i‖²
/// (W0 is frozen; refreshed when the layer's base weight version changes), the detached norm ‖W0 + s·B·A‖ of the last
/// forward (see <see cref="NormKey"/>) and, while merged, the factor m/‖V‖ used for the merge (unmerging needs the
/// pre-merge norm, which the merged weight no longer gives).
/// </summary>
public sealed class DoraLinearLayer : Module
{
    private (long layer, long dense) cachedVersion = (-1, -1);
    private Tensor? baseNormsSquared;
    private Tensor? cachedNorm;
    private NormKey cachedNormKey;

    public DoraLinearLayer(Tensor magnitude) : base("DoraLinearLayer") => register_parameter("weight", magnitude);

    /// <summary>m, one entry per output feature.</summary>
    public Tensor weight => Parameter("weight");

    /// <summary>
    /// ‖W0_i‖² in <paramref name="dtype"/> for the layer's current base weight, cached until it changes: the layer's
    /// <see cref="LoRAHub.Plugins.LoRA.LoraLinear.BaseWeightVersion"/> (merge/unmerge) or the dense weight's own version
    /// counter (an in-place write behind the layer's back; 0 for a quantized base).
    /// </summary>
    public Tensor BaseNormsSquared(Tensor w0, long baseWeightVersion, long denseWeightVersion, ScalarType dtype)
    {
        var cached = baseNormsSquared;
        var version = (baseWeightVersion, denseWeightVersion);
        if (cached != null && cachedVersion == version && cached.dtype == dtype && cached.device == w0.device) return cached;
        Tensor fresh;
        using (torch.no_grad()) fresh = DoraWeightNorm.RowNormsSquared(w0, dtype);
        // Not persistent: derived from W0, never saved with the adapter.
        register_buffer("base_norms_squared", fresh, persistent: false);
        cached?.Dispose();
        baseNormsSquared = fresh;
        cachedVersion = version;
        return fresh;
    }

    /// <summary>
    /// What a detached norm ‖W0 + s·B·A‖ depends on: A's and B's storage and version counters (an optimizer step, a load
    /// or any in-place write bumps them; a re-created or moved adapter has new storage), the layer's base weight version
    /// (merge/unmerge), the dense base weight's own version counter (0 for a quantized base, whose writes go through the
    /// layer) and the scaling.
    /// </summary>
    public readonly record struct NormKey(long AStorage, long AVersion, long BStorage, long BVersion, long BaseVersion,
        long DenseWeightVersion, double Scaling);

    /// <summary>The norm computed for <paramref name="key"/>, or null when the cache holds none for it.</summary>
    public Tensor? CachedNorm(in NormKey key) => cachedNorm != null && cachedNormKey == key ? cachedNorm : null;

    /// <summary>Keeps <paramref name="norm"/> (a detached tensor, taken out of every dispose scope) as the norm for <paramref name="key"/>.</summary>
    public void CacheNorm(in NormKey key, Tensor norm)
    {
        cachedNorm?.Dispose();
        cachedNorm = norm.DetachFromDisposeScope();
        cachedNormKey = key;
        NormComputations++;
    }

    /// <summary>Drops the cached norm (the next forward computes it again).</summary>
    public void ClearNormCache()
    {
        cachedNorm?.Dispose();
        cachedNorm = null;
    }

    /// <summary>How many norms this layer computed and cached so far (tests and diagnostics: a cache hit does not count).</summary>
    public long NormComputations { get; private set; }

    /// <summary>m/‖V‖ recorded by a merge (disposed by the unmerge that consumes it), or null when not merged.</summary>
    public Tensor? MergeFactor { get; set; }

    public override void Dispose()
    {
        ClearNormCache();
        base.Dispose();
    }
}
