using LoRAHub.Torch;
using LoRAHub.Torch.NN;

namespace LoRAHub.Plugins.DoRA;

/// <summary>
/// One adapter's DoRA state on one layer, named as PEFT's DoraLinearLayer: the trainable magnitude m (out) as its
/// "weight", so the parameter path is "&lt;layer&gt;.lora_magnitude_vector.&lt;adapter&gt;.weight". It also caches ‖W0_i‖²
/// (W0 is frozen; refreshed when the layer's base weight version changes) and, while merged, the factor m/‖V‖
/// used for the merge (unmerging needs the pre-merge norm, which the merged weight no longer gives).
/// </summary>
public sealed class DoraLinearLayer : Module
{
    private long cachedVersion = -1;

    public DoraLinearLayer(Tensor magnitude) : base("DoraLinearLayer") => register_parameter("weight", magnitude);

    /// <summary>m, one entry per output feature.</summary>
    public Tensor weight => Parameter("weight");

    /// <summary>‖W0_i‖² in <paramref name="dtype"/> for the layer's current base weight (cached until it changes).</summary>
    public Tensor BaseNormsSquared(Tensor w0, long baseWeightVersion, ScalarType dtype)
    {
        var cached = named_buffers(recurse: false).FirstOrDefault(b => b.name == "base_norms_squared").buffer;
        if (cached != null && cachedVersion == baseWeightVersion && cached.dtype == dtype) return cached;
        Tensor fresh;
        using (torch.no_grad()) fresh = DoraWeightNorm.RowNormsSquared(w0, dtype);
        // Not persistent: derived from W0, never saved with the adapter.
        register_buffer("base_norms_squared", fresh, persistent: false);
        cached?.Dispose();
        cachedVersion = baseWeightVersion;
        return fresh;
    }

    /// <summary>m/‖V‖ recorded by a merge (disposed by the unmerge that consumes it), or null when not merged.</summary>
    public Tensor? MergeFactor { get; set; }
}
