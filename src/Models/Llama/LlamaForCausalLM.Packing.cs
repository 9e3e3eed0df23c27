using LoRAHub.Abstractions;
using static TorchSharp.torch;

namespace LoRAHub.Models.Llama;

// Padding-free packing: several examples in one row, each with positions restarting at 0, attending only within itself.
// The rotary tables are gathered per position and attention takes a block-diagonal causal mask, so an example's hidden
// states in a packed row are those it has alone.
public sealed partial class LlamaForCausalLM
{
    /// <summary>
    /// True while packed rows give exactly what the examples give alone: the model's own attention (a replaced one, e.g.
    /// LongLoRA's shifted groups, does not take the block-diagonal mask) and no router load-balancing loss (Mixtral's is
    /// averaged over the rows' tokens).
    /// </summary>
    public bool SupportsPacking => IsDefaultAttention(Attention) && !AddsRouterAuxLoss;

    /// <summary>
    /// Logits (batch, seq, vocab) of packed rows: <paramref name="positionIds"/> (batch, seq) restart at 0 where an
    /// example starts (more generally: a new example starts wherever a position is not its predecessor's + 1).
    /// </summary>
    public Tensor ForwardPacked(Tensor inputIds, Tensor positionIds)
    {
        using var scope = NewDisposeScope();
        var h = HiddenStates(inputIds, null, null, positionIds);
        var logits = lm_head is null ? nn.functional.linear(h, _model.embed_weight) : lm_head.call(h);
        return SoftCap(logits).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Mean next-token loss of packed rows (see <see cref="ForwardPacked"/>). <paramref name="labels"/> must already be
    /// -100 at the first token of every example (so that it is not predicted from the previous example's last token) and
    /// on padding.
    /// </summary>
    public Tensor ComputePackedLoss(Tensor inputIds, Tensor labels, Tensor positionIds)
    {
        if (!SupportsPacking)
            throw new NotSupportedException(AddsRouterAuxLoss
                ? "packed rows are not supported with Mixtral's router load-balancing loss (it averages over every token of a row); train with padded batches (TrainerOptions.Packing = false)"
                : "packed rows need the model's own attention, which takes the block-diagonal mask; a replaced attention function (e.g. LongLoRA's) does not: train with padded batches (TrainerOptions.Packing = false)");
        using var scope = NewDisposeScope();
        return LanguageModelLoss(inputIds, labels, null, positionIds).MoveToOuterDisposeScope();
    }

    // Checks what packed rows come with; PackedAttention.Segments checks the ids' range (on the host, where it reads them).
    private static void CheckPositionIds(Tensor inputIds, Tensor? attentionMask, KvCache? cache, Tensor positionIds)
    {
        if (cache is not null) throw new NotSupportedException("packed rows (position ids) cannot be decoded with a KV cache; decode examples one per row");
        if (attentionMask is not null)
            throw new ArgumentException("packed rows take position ids instead of an attention mask: padding at the end of a row is one more example (labels -100)");
        if (positionIds.dim() != 2 || positionIds.size(0) != inputIds.size(0) || positionIds.size(1) != inputIds.size(1))
            throw new ArgumentException($"position ids must have the shape of the input ids ({string.Join(", ", inputIds.shape)}), got ({string.Join(", ", positionIds.shape)})");
    }
}
