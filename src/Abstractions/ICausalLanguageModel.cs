using LoRAHub.Torch;

namespace LoRAHub.Abstractions;

/// <summary>A decoder-only language model the trainer can train and evaluate.</summary>
public interface ICausalLanguageModel : IAdaptableModel
{
    /// <summary>
    /// Mean next-token cross-entropy: labels are shifted inside (as transformers does) and -100 marks tokens that
    /// add no loss. Implementations compute it in chunks so full-vocabulary fp32 logits are never all held at once.
    /// </summary>
    Tensor ComputeLoss(Tensor inputIds, Tensor labels, Tensor? attentionMask = null);

    /// <summary>Logits (batch, seq, vocab).</summary>
    Tensor Forward(Tensor inputIds, Tensor? attentionMask = null);

    /// <summary>Recompute each decoder layer in backward instead of keeping its activations.</summary>
    bool GradientCheckpointing { get; set; }
}

/// <summary>Text to token ids and back, plus what data formatting needs.</summary>
public interface ITokenizer
{
    int[] Encode(string text, bool addSpecialTokens = true);
    string Decode(IEnumerable<int> ids, bool skipSpecialTokens = true);
    int? BosTokenId { get; }
    int? EosTokenId { get; }
    int PadTokenId { get; }
    int VocabSize { get; }

    /// <summary>Renders chat messages (role, content) in the model's chat format.</summary>
    string ApplyChatTemplate(IReadOnlyList<(string Role, string Content)> messages, bool addGenerationPrompt);
}
