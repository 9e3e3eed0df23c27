using static TorchSharp.torch;

namespace LoRAHub.Abstractions;

/// <summary>
/// A decoder-only language model: what the trainer trains, generation decodes with, and a Hugging Face folder holds.
/// Only <see cref="ComputeLoss"/>, <see cref="Forward(Tensor, Tensor?)"/>, <see cref="LayerCount"/> and
/// <see cref="VocabSize"/> are required; the rest have defaults for a model without a KV cache or a config.json.
/// </summary>
public interface ICausalLanguageModel : IAdaptableModel, IDisposable
{
    /// <summary>
    /// Mean next-token cross-entropy: labels are shifted inside (as transformers does) and -100 marks tokens that
    /// add no loss. Implementations compute it in chunks so full-vocabulary fp32 logits are never all held at once.
    /// </summary>
    Tensor ComputeLoss(Tensor inputIds, Tensor labels, Tensor? attentionMask = null);

    /// <summary>Logits (batch, seq, vocab).</summary>
    Tensor Forward(Tensor inputIds, Tensor? attentionMask = null);

    /// <summary>
    /// Whether <see cref="ComputePackedLoss"/> is exact now: packed rows give each example the loss it has alone (the
    /// trainer packs only then). False by default.
    /// </summary>
    bool SupportsPacking => false;

    /// <summary>
    /// Mean next-token loss of packed rows: several examples per row, <paramref name="positionIds"/> (batch, seq)
    /// restarting at 0 where each starts, attention never crossing an example; <paramref name="labels"/> are -100 at
    /// each example's first token and on padding. Models without packing support throw.
    /// </summary>
    Tensor ComputePackedLoss(Tensor inputIds, Tensor labels, Tensor positionIds) =>
        throw new NotSupportedException($"{GetType().Name} does not support packed rows (position ids restarting within a row); train with padded batches (TrainerOptions.Packing = false)");

    /// <summary>
    /// Logits for incremental decoding: with a cache, <paramref name="inputIds"/> are the new positions only and
    /// <paramref name="attentionMask"/> covers all positions (cached and new).
    /// </summary>
    Tensor Forward(Tensor inputIds, Tensor? attentionMask, KvCache? cache) =>
        cache is null ? Forward(inputIds, attentionMask)
            : throw new NotSupportedException($"{GetType().Name} has no KV cache; generate with UseCache = false");

    /// <summary>Recompute each decoder layer in backward instead of keeping its activations.</summary>
    bool GradientCheckpointing { get; set; }

    /// <summary>
    /// Per-layer activation checkpointing (keep, checkpoint, or checkpoint with the input offloaded to pinned host memory;
    /// by a memory budget with <see cref="LoRAHub.TorchExtensions.CheckpointPolicy.Budget"/>). Null: <see cref="GradientCheckpointing"/>
    /// decides, all layers or none. Models without per-layer control take only none and all (mapped onto GradientCheckpointing).
    /// </summary>
    LoRAHub.TorchExtensions.CheckpointPolicy? CheckpointPolicy
    {
        get => null;
        set
        {
            if (value is not null && value != LoRAHub.TorchExtensions.CheckpointPolicy.None && value != LoRAHub.TorchExtensions.CheckpointPolicy.All)
                throw new NotSupportedException($"{GetType().Name} checkpoints all layers or none: it takes CheckpointPolicy none or all " +
                    $"(or GradientCheckpointing), not '{value}'");
            if (value is not null) GradientCheckpointing = value == LoRAHub.TorchExtensions.CheckpointPolicy.All;
        }
    }

    /// <summary>Number of decoder layers (the KV cache's size).</summary>
    int LayerCount { get; }

    int VocabSize { get; }

    /// <summary>config.json content, transformers-compatible, with torch_dtype set to the weights' dtype.</summary>
    string ConfigJson() => throw new NotSupportedException($"{GetType().Name} has no config.json: it cannot be saved as a Hugging Face model folder");

    /// <summary>Checkpoint keys that transformers may write but that carry nothing we load (e.g. GPT-2's attn.bias masks).</summary>
    bool IsIgnorableCheckpointKey(string key) => false;
}
