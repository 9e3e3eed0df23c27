using LoRAHub.Abstractions;
using LoRAHub.Torch;

namespace LoRAHub.Models;

/// <summary>What loading, saving and generation need beyond the trainer's contract: cached forward and the config.</summary>
public interface ICausalLM : ICausalLanguageModel, IDisposable
{
    /// <summary>Logits (batch, seq, vocab); with a cache, inputIds are the new positions only and attentionMask covers all.</summary>
    Tensor forward(Tensor inputIds, Tensor? attentionMask = null, KvCache? cache = null);

    /// <summary>Number of decoder layers (the KV cache size).</summary>
    int LayerCount { get; }

    int VocabSize { get; }

    /// <summary>config.json content, transformers-compatible, with torch_dtype set to the weights' dtype.</summary>
    string ConfigJson();

    /// <summary>Checkpoint keys that transformers may write but that carry nothing we load (e.g. GPT-2's attn.bias masks).</summary>
    bool IsIgnorableCheckpointKey(string key);
}
