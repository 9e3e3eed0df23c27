using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Tuners;

/// <summary>
/// A tuner layer whose whole update is one weight delta (AdaLoRA's SVD triplets, head-aware LoRA's blocks): merge adds
/// <see cref="DeltaWeight"/> to the base weight, unmerge subtracts it again.
/// </summary>
public abstract class DeltaTunerLayer : TunerLayer
{
    private bool merged;

    protected DeltaTunerLayer(string name, nn.Module<Tensor, Tensor> baseLayer, string method) : base(name, baseLayer, method)
    {
    }

    /// <summary>ΔW (out × in), the update forward adds to the base layer's output.</summary>
    public abstract Tensor DeltaWeight();

    /// <summary>False where the layer has no update at all (e.g. every rank pruned): merge then leaves the base alone.</summary>
    protected virtual bool HasDelta => true;

    public override bool Merged => merged;

    public override void Merge()
    {
        if (merged || !HasDelta) return;
        CheckInPlaceMerge();
        AddDelta(negate: false);
        merged = true;
    }

    public override void Unmerge()
    {
        if (!merged) return;
        AddDelta(negate: true);
        merged = false;
    }

    private void AddDelta(bool negate)
    {
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        var delta = DeltaWeight();
        AddToBaseWeight(negate ? delta.neg() : delta);
    }
}
