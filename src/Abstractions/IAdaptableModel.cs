using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Abstractions;

/// <summary>
/// What a method needs from a model: its module tree (names as in transformers, so adapter keys match PEFT),
/// placement, a description for adapter configs, and an attention hook.
/// </summary>
public interface IAdaptableModel
{
    /// <summary>The root module; paths are dotted names such as "model.layers.0.self_attn.q_proj".</summary>
    nn.Module Root { get; }

    Device Device { get; }

    /// <summary>The dtype of the frozen weights (bf16 on GPU, fp32 on CPU usually).</summary>
    ScalarType DType { get; }

    /// <summary>Architecture ("llama", "gpt2") as in config.json's model_type.</summary>
    string ModelType { get; }

    /// <summary>Where the base model came from (recorded as base_model_name_or_path in adapter configs).</summary>
    string NameOrPath { get; }

    /// <summary>Dotted names of modules that are output heads (never adapted unless asked).</summary>
    IReadOnlyList<string> OutputModuleNames { get; }

    /// <summary>
    /// The attention kernel used by every layer; methods may replace it (LongLoRA) and must restore it on dispose.
    /// </summary>
    AttentionFunction Attention { get; set; }
}

/// <summary>
/// Attention over (batch, heads, seq, head_dim) tensors with a causal mask; the default is fused SDPA.
/// <paramref name="paddingMask"/> is (batch, seq) bool, true for real tokens, or null.
/// </summary>
public delegate Tensor AttentionFunction(Tensor query, Tensor key, Tensor value, Tensor? paddingMask);
