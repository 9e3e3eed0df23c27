using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.DoRA;

/// <summary>
/// One adapter's DoRA state on one layer, named as PEFT's DoraLinearLayer: the trainable magnitude m (out) as its
/// "weight", so the parameter path is "&lt;layer&gt;.lora_magnitude_vector.&lt;adapter&gt;.weight". Within a training step it
/// also caches ‖W0_i‖² and the detached norm ‖W0 + s·B·A‖ of the step's first forward (see <see cref="NormKey"/>; the
/// checkpoint recompute and later micro-batches reuse it), with the row scale m/‖V‖ when the grouped kernel wrote it beside
/// the norm (<see cref="DoraNormGroup"/>), and while merged the factor m/‖V‖ used for the merge
/// (unmerging needs the pre-merge norm, which the merged weight no longer gives).
/// </summary>
public sealed class DoraLinearLayer : nn.Module
{
    [ComponentName(Name = "weight")] private readonly Parameter weight_;
    private Tensor? baseNormsSquared;
    private BaseKey baseNormsKey;
    private Tensor? cachedNorm, cachedScale;
    private NormKey cachedNormKey;

    public DoraLinearLayer(Parameter magnitude) : base(nameof(DoraLinearLayer))
    {
        weight_ = magnitude;
        RegisterComponents();
    }

    /// <summary>m, one entry per output feature.</summary>
    public Parameter weight => weight_;

    /// <summary>
    /// What ‖W0_i‖² depends on: the training step it was computed in (nothing is cached outside a step, see
    /// <see cref="LoRAHub.Tuners.Lora.LoraLinear.StepToken"/>), the layer's base weight version (merge, unmerge and other
    /// writes through the layer), the dense base weight tensor (0 for a quantized base, whose dense weight is built
    /// on each call), and the dtype and device asked for.
    /// </summary>
    public readonly record struct BaseKey(long Step, long BaseVersion, IntPtr DenseWeight, ScalarType DType, DeviceType DeviceType, int DeviceIndex);

    /// <summary>
    /// What a detached norm ‖W0 + s·B·A‖ depends on: the training step (the optimizer step that changes A and B ends it),
    /// the layer's base and adapter weight versions (merge, unmerge, loads, hot swaps), A's and B's storage, the dense base
    /// weight tensor (a moved or re-created tensor; not its storage, which re-homing into a stack moves) and the scaling.
    /// </summary>
    public readonly record struct NormKey(long Step, long BaseVersion, long AdapterVersion, IntPtr A, IntPtr B, IntPtr DenseWeight,
        double Scaling);

    /// <summary>‖W0_i‖² for <paramref name="key"/> (computed by <paramref name="compute"/> unless cached); cached only when <paramref name="cache"/>.</summary>
    public Tensor BaseNormsSquared(in BaseKey key, bool cache, Func<Tensor> compute)
    {
        if (cache && baseNormsSquared is not null && baseNormsKey == key) return baseNormsSquared;
        var fresh = compute();
        if (!cache) return fresh;
        baseNormsSquared?.Dispose();
        baseNormsSquared = fresh.DetachFromDisposeScope();
        baseNormsKey = key;
        return fresh;
    }

    /// <summary>The norm computed for <paramref name="key"/>, or null when the cache holds none for it.</summary>
    public Tensor? CachedNorm(in NormKey key) => cachedNorm is not null && cachedNormKey == key ? cachedNorm : null;

    /// <summary>
    /// m/‖V‖ (fp32) computed with the norm for <paramref name="key"/>, or null when none was (the norm alone was cached).
    /// Only valid while m is unchanged: within the training step of the key (the optimizer step that changes m ends it).
    /// </summary>
    public Tensor? CachedScale(in NormKey key) => cachedScale is not null && cachedNorm is not null && cachedNormKey == key ? cachedScale : null;

    /// <summary>The cached row scale when it is from another step than <paramref name="step"/> (as <see cref="StaleNorm"/>).</summary>
    internal Tensor? StaleScale(long step) => cachedScale is not null && cachedNorm is not null && cachedNormKey.Step != step ? cachedScale : null;

    /// <summary>
    /// The cached norm when it is from another step than <paramref name="step"/>, as a buffer the new norm may be written
    /// into: only that step's autograd graph read it, and its backward ran before the optimizer step that ended it. Within
    /// a step (a write announced between forward and backward) null: a graph of this step may still read it.
    /// </summary>
    internal Tensor? StaleNorm(long step) => cachedNorm is not null && cachedNormKey.Step != step ? cachedNorm : null;

    /// <summary>
    /// Keeps <paramref name="norm"/> (a detached tensor, taken out of every dispose scope) as the norm for <paramref name="key"/>,
    /// and <paramref name="scale"/> (m/‖V‖, or null: none) with it; each may be the cached tensor itself, rewritten in place
    /// (<see cref="StaleNorm"/>, <see cref="StaleScale"/>).
    /// </summary>
    public void CacheNorm(in NormKey key, Tensor norm, Tensor? scale = null)
    {
        if (!ReferenceEquals(norm, cachedNorm))
        {
            cachedNorm?.Dispose();
            cachedNorm = norm.DetachFromDisposeScope();
        }
        if (!ReferenceEquals(scale, cachedScale))
        {
            cachedScale?.Dispose();
            cachedScale = scale?.DetachFromDisposeScope();
        }
        cachedNormKey = key;
        NormComputations++;
    }

    /// <summary>Drops the cached values (the next forward computes them again).</summary>
    public void ClearNormCache()
    {
        cachedNorm?.Dispose();
        cachedNorm = null;
        cachedScale?.Dispose();
        cachedScale = null;
        baseNormsSquared?.Dispose();
        baseNormsSquared = null;
    }

    /// <summary>How many norms this layer computed and cached so far (tests and diagnostics: a cache hit does not count).</summary>
    public long NormComputations { get; private set; }

    /// <summary>m/‖V‖ recorded by a merge (disposed by the unmerge that consumes it), or null when not merged.</summary>
    public Tensor? MergeFactor { get; set; }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            ClearNormCache();
            MergeFactor?.Dispose();
            MergeFactor = null;
        }
        base.Dispose(disposing);
    }
}
