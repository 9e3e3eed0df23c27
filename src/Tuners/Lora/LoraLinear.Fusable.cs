using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Modules;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Tuners.Lora;

/// <summary>What a LoRA layer offers the fused LoRA blocks (<see cref="LoraFusion"/>): its parts, where exact.</summary>
public sealed partial class LoraLinear : ILowRankLinear
{
    /// <summary>
    /// W, b and the one adapter's A, B, s when forward computes exactly x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ: a frozen dense or 4-bit base and
    /// at most one active unmerged adapter, without dropout (or in eval), lora bias or row routing, and for an adapter
    /// with a variant the parts the variant supplies (<see cref="ILoraVariant.FusedParts"/>; DoRA adds a row scale).
    /// Otherwise null and why (the block then runs this layer's own forward).
    /// </summary>
    public LowRankParts? low_rank_parts(out string reason)
    {
        if (RowAdapters is not null) return No("row routing", out reason);
        // A dense base is used as it is; a 4-bit one is dequantized inside the fused block for each GEMM that needs it.
        Func<Tensor?, Tensor?, double, LowRankParts>? parts = base_layer switch
        {
            Linear { weight: { requires_grad: false } w, bias: null or { requires_grad: false } } linear =>
                (a, b, s) => new LowRankParts(w, linear.bias, a, b, s),
            Linear4bit { bias: null or { requires_grad: false } } q => (a, b, s) => LowRankParts.FromComputedWeight(q, q.bias, a, b, s),
            _ => null,
        };
        if (parts is null) return No(base_layer is Linear or Linear4bit ? "trainable base" : $"base is a {base_layer.GetType().Name}", out reason);
        reason = "";
        // What forward applies: nothing beyond the base when adapters are off or all merged.
        var pending = AdaptersEnabled ? ActiveAdapters.Where(a => settings.ContainsKey(a) && !merged.Contains(a)).ToList() : [];
        if (pending.Count == 0) return parts(null, null, 0);
        if (pending.Count > 1) return No($"{pending.Count} active adapters", out reason);
        var name = pending[0];
        if (BBias(name) is not null) return No("lora bias", out reason);
        if (lora_dropout[name] is not Dropout drop) return No($"dropout module {lora_dropout[name].GetType().Name}", out reason);
        if (drop.training && drop.p > 0) return No($"dropout {drop.p}", out reason);
        var plain = parts(A(name), B(name), Scaling(name));
        // A variant (DoRA, ...) changes what forward computes: fused only with the parts it supplies.
        return variants.TryGetValue(name, out var variant) ? variant.FusedParts(this, name, plain, out reason) : plain;
    }

    private static LowRankParts? No(string why, out string reason)
    {
        reason = why;
        return null;
    }
}
