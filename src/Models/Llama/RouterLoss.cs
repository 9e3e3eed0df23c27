using static TorchSharp.torch;

namespace LoRAHub.Models.Llama;

/// <summary>
/// The Switch Transformer load-balancing loss as transformers' Mixtral computes it (load_balancing_loss_func): over all
/// layers' router logits, E · Σ_e f_e · P_e, where f_e is the share of top-k slots that went to expert e (per slot rank)
/// and P_e the mean router probability of e; padding tokens (mask 0) are left out of both means. Uniform routing gives k.
/// </summary>
public static class RouterLoss
{
    /// <param name="routerLogits">Per layer, (batch·seq) × experts.</param>
    /// <param name="attentionMask">(batch, seq), 1 for real tokens; null: every token counts.</param>
    public static Tensor LoadBalancing(IReadOnlyList<Tensor> routerLogits, int numExperts, int topK, Tensor? attentionMask = null)
    {
        if (routerLogits.Count == 0) throw new ArgumentException("no router logits: the model has no MoE layer or did not record them");
        using var scope = NewDisposeScope();
        var logits = cat(routerLogits.Select(l => l.to(ScalarType.Float32)).ToArray(), 0);     // (L·N) × E
        var probs = nn.functional.softmax(logits, -1);
        var (_, chosen) = probs.topk(topK, -1);
        var slots = nn.functional.one_hot(chosen, numExperts).to(ScalarType.Float32);          // (L·N) × k × E
        Tensor tokensPerExpert, probPerExpert;
        if (attentionMask is null)
        {
            tokensPerExpert = slots.mean([0]);
            probPerExpert = probs.mean([0]);
        }
        else
        {
            var mask = attentionMask.to(ScalarType.Float32, probs.device).reshape(-1).repeat(routerLogits.Count); // L·N
            var m3 = mask.view(-1, 1, 1);
            tokensPerExpert = (slots * m3).sum(dim: 0) / m3.sum(dim: 0);
            var m2 = mask.view(-1, 1);
            probPerExpert = (probs * m2).sum(dim: 0) / m2.sum(dim: 0);
        }
        var loss = (tokensPerExpert * probPerExpert.unsqueeze(0)).sum() * numExperts;
        return loss.MoveToOuterDisposeScope();
    }
}
