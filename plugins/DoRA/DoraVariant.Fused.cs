using LoRAHub.Tuners.Lora;
using LoRAHub.TorchExtensions;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.DoRA;

/// <summary>DoRA in the fused LoRA blocks (<see cref="LoraFusion"/>).</summary>
public sealed partial class DoraVariant
{
    /// <summary>
    /// With the norm detached (DoRA's and PEFT's default, or no grad) and dropout the identity, forward is
    /// y = base(x) + (m/‖V‖ − 1)·(base(x) − b) + (m/‖V‖)·s·B·A·x = c ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b with c = m/‖V‖ per
    /// output row: plain LoRA's parts with c as their row scale. c is made per fused call from the same norm forward
    /// uses (cached for the training step) and divides m under autograd, so m gets its gradient through c and A, B through
    /// the product, as in <see cref="Forward"/>. Not detached, the norm's own gradient to A and B would be lost: refused.
    /// (The layer has already refused dropout in training, see <see cref="ILoraVariant.FusedParts"/>; a frozen dense or
    /// 4-bit base is in <paramref name="plain"/>.)
    /// </summary>
    public LowRankParts? FusedParts(LoraLinear layer, string adapter, LowRankParts plain, out string reason)
    {
        if (!Options.DetachNorm && is_grad_enabled())
        {
            reason = "DoRA norm not detached (DetachNorm = false)";
            return null;
        }
        reason = "";
        var dora = Layer(layer, adapter);
        return plain with { RowScale = () => dora.weight.div(ForwardNorm(layer, adapter, dora)) };
    }
}
