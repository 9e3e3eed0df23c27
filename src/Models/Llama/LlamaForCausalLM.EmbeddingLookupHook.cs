using LoRAHub.Abstractions;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Models.Llama;

// Data parallelism's embedding hook (IEmbeddingLookupHook): the lookup of a plain embedding table, in training forward.
public sealed partial class LlamaForCausalLM : IEmbeddingLookupHook
{
    public Tensor? EmbeddingTable => _model.plain_embed_weight;

    public bool EmbeddingTiedToHead => Config.TieWordEmbeddings;

    public Func<Tensor, Tensor, Tensor?>? EmbeddingLookup { get; set; }

    // The hook where one is set and autograd records through a table that trains; else the model's own lookup.
    private Tensor Embed(Tensor inputIds) =>
        _model.embed(inputIds, EmbeddingLookup is { } hook && is_grad_enabled() && EmbeddingTable is { requires_grad: true } ? hook : null);
}
