using LoRAHub.Tuners;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MethodPlugin;

/// <summary>
/// One adapted Linear: y = base(x ⊙ scale), a learned per-input-feature scale starting at 1 (PEFT's IA³ on feed-forward
/// layers). TunerLayer holds the base as the child "base_layer", routes forward to it when the adapter is disabled or
/// merged, and disposes it with the layer; this class adds the parameter and its math.
/// </summary>
public sealed class MethodPluginLayer : TunerLayer
{
    private readonly Parameter scale_;
    private bool merged;

    public MethodPluginLayer(nn.Module<Tensor, Tensor> baseLayer) : base(nameof(MethodPluginLayer), baseLayer, MethodPluginMethod.DisplayName)
    {
        scale_ = new Parameter(ones([base_linear.in_features], ScalarType.Float32, base_linear.weight_device));
        register_parameter("scale", scale_);
    }

    public Parameter scale => scale_;

    public override bool Merged => merged;

    protected override Tensor AdaptedForward(Tensor input)
    {
        using var scope = NewDisposeScope();
        return base_layer.call(input.mul(scale_.to(input.dtype))).MoveToOuterDisposeScope();
    }

    /// <summary>W·diag(scale): W += W ⊙ (scale − 1), column by column.</summary>
    public override void Merge()
    {
        if (merged) return;
        CheckInPlaceMerge();
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var w = base_linear.dense_weight().to(ScalarType.Float32);
        AddToBaseWeight(w.mul(scale_ - 1));
        merged = true;
    }

    /// <summary>W = W_merged / scale: W += W_merged ⊙ (1/scale − 1).</summary>
    public override void Unmerge()
    {
        if (!merged) return;
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var w = base_linear.dense_weight().to(ScalarType.Float32);
        AddToBaseWeight(w.mul(scale_.reciprocal() - 1));
        merged = false;
    }
}
