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
    /// uses (cached for the training step): as <see cref="LowRankParts.DividedRowScale"/> (what the fused functions take)
    /// c's values with m as the autograd input and ‖V‖ as the divisor of its gradient, and as
    /// <see cref="LowRankParts.RowScale"/> m.div(‖V‖) under autograd; either way m gets its gradient dc/‖V‖ and A, B theirs
    /// through the product, as in <see cref="Forward"/>. Not detached, the norm's own gradient to A and B would be lost: refused.
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
        return plain with
        {
            // c = m/‖V‖ as a new tensor (under autograd when grad mode is on: m's gradient flows through the division).
            RowScale = () => dora.weight.div(ForwardNorm(layer, adapter, dora)),
            // What the fused functions take instead: c's values without a division node, and m's gradient dc/‖V‖ formed in
            // the launch that sums dc (no division launch per projection either way).
            DividedRowScale = () => Divided(layer, adapter, dora),
        };
    }

    // (c, m, ‖V‖) with c = m/‖V‖ without autograd: the c the grouped kernel wrote beside the step's norm where it did
    // (DoraNormGroup; the bits of m.div(norm); a buffer the next step's kernel rewrites, so only for the fused call that
    // asks), else that division under no_grad.
    private (Tensor c, Tensor magnitude, Tensor divisor) Divided(LoraLinear layer, string adapter, DoraLinearLayer dora)
    {
        var norm = ForwardNorm(layer, adapter, dora, out var key);
        if (key is { } k && dora.CachedScale(k) is { } c && ReferenceEquals(dora.CachedNorm(k), norm))
            return (c, dora.weight, norm);
        using var _ = no_grad();
        return (dora.weight.div(norm), dora.weight, norm);
    }
}
