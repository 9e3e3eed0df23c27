using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Modules;
using TorchSharp;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace LoRAHub.Tuners;

/// <summary>
/// An adapter layer wrapping a Linear-like base layer (PEFT's BaseTunerLayer): the base is its child "base_layer",
/// registered once, so parameter paths and state-dict keys read "&lt;path&gt;.base_layer.weight" as in PEFT. The base is
/// any <see cref="ILinearLayer"/> module (TorchSharp's Linear, Linear4bit, GPT-2's Conv1D).
/// Disposal follows TorchSharp's rule: disposing the layer disposes its children, the base included, unless
/// <see cref="Unwrap"/> took the base back first.
/// </summary>
public abstract class TunerLayer : nn.Module<Tensor, Tensor>
{
    [ComponentName(Name = "base_layer")] private nn.Module<Tensor, Tensor>? baseLayer;

    protected TunerLayer(string name, nn.Module<Tensor, Tensor> baseLayer, string method) : base(name)
    {
        if (!LinearLayer.IsLinear(baseLayer))
            throw new ArgumentException($"{method} wraps Linear layers (dense, 4-bit or GPT-2's Conv1D); got a {baseLayer.TypeName()}", nameof(baseLayer));
        this.baseLayer = baseLayer;
        // Registered first, so it comes first among the children as in PEFT.
        register_module("base_layer", baseLayer);
    }

    /// <summary>The wrapped layer (PEFT's get_base_layer).</summary>
    public nn.Module<Tensor, Tensor> base_layer =>
        baseLayer ?? throw new InvalidOperationException($"this {GetType().Name} was unloaded: its base layer went back into the model");

    /// <summary>
    /// The base as a linear map (dense or quantized weight). A view computed on each call, not a field: a field holding a
    /// base that is its own ILinearLayer (Linear4bit) would make TorchSharp register the base a second time.
    /// </summary>
    public ILinearLayer base_linear => LinearLayer.From(base_layer)!;

    /// <summary>True when the base stores 4-bit weights: merging into it in place would re-quantize.</summary>
    public bool IsQuantized => baseLayer is Linear4bit;

    /// <summary>False: forward is exactly the base layer (PEFT's disable_adapters).</summary>
    public bool AdaptersEnabled { get; set; } = true;

    /// <summary>Whether the adapter's update is folded into the base weight.</summary>
    public abstract bool Merged { get; }

    /// <summary>Folds the active adapter into the base weight (PEFT's merge).</summary>
    public abstract void Merge();

    /// <summary>Subtracts what <see cref="Merge"/> added.</summary>
    public abstract void Unmerge();

    /// <summary>Counts writes to the base weight through this layer (merge, unmerge, <see cref="AddToBaseWeight"/>, <see cref="ReplaceBase"/>).</summary>
    public long BaseWeightVersion { get; protected set; }

    /// <summary>W += delta on the base layer (dense or quantized).</summary>
    public void AddToBaseWeight(Tensor delta)
    {
        base_linear.add_to_weight_(delta);
        BaseWeightVersion++;
    }

    /// <summary>W ← <paramref name="weight"/> (out×in, any float dtype; rounded once to W's) on a dense base (PiSSA's residual).</summary>
    public void SetBaseWeight(Tensor weight)
    {
        CheckInPlaceMerge();
        using var _ = no_grad();
        base_linear.dense_weight().copy_(weight);
        BaseWeightVersion++;
    }

    /// <summary>Throws, pointing to merge_and_unload, when the base is 4-bit: an in-place merge would re-quantize it.</summary>
    protected void CheckInPlaceMerge()
    {
        if (IsQuantized)
            throw new InvalidOperationException("merging into a 4-bit base in place would quantize the merged weight again (lossy, and not " +
                "reversible); use MergeAndUnload(), which gives a dense model with the merged weights in bf16 (or the model's dtype)");
    }

    /// <summary>
    /// Puts <paramref name="replacement"/> (computing the same map, e.g. a 4-bit base dequantized to a dense Linear) in
    /// place of the base and returns the old base, no longer a child (the caller disposes it).
    /// </summary>
    public nn.Module<Tensor, Tensor> ReplaceBase(nn.Module<Tensor, Tensor> replacement)
    {
        if (LinearLayer.From(replacement) is not { } linear || linear.in_features != base_linear.in_features || linear.out_features != base_linear.out_features)
            throw new ArgumentException($"the replacement base must be a Linear-like {base_linear.out_features}×{base_linear.in_features} layer");
        var old = base_layer;
        replacement.train(old.training);
        this.replace_submodule("base_layer", replacement);
        baseLayer = replacement;
        BaseWeightVersion++;
        return old;
    }

    /// <summary>
    /// Takes the base layer out of this layer (PEFT's get_base_layer on unload): it is no longer a child, so disposing
    /// this layer frees only the adapter's own modules and tensors. The layer must not be used afterwards.
    /// </summary>
    public nn.Module<Tensor, Tensor> Unwrap()
    {
        var taken = base_layer;
        register_module("base_layer", null!);
        baseLayer = null;
        return taken;
    }

    public sealed override Tensor forward(Tensor input) =>
        AdaptersEnabled && HasUnmergedWork ? AdaptedForward(input) : base_layer.call(input);

    /// <summary>Whether forward has adapter work beyond the base layer (default: nothing merged).</summary>
    protected virtual bool HasUnmergedWork => !Merged;

    /// <summary>The output with the (unmerged, enabled) adapter applied.</summary>
    protected abstract Tensor AdaptedForward(Tensor input);
}
