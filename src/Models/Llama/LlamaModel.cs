using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace LoRAHub.Models.Llama;

/// <summary>The decoder stack: embeddings, layers, final norm (transformers' LlamaModel, registered as "model").</summary>
public sealed class LlamaModel : nn.Module
{
    private Module<Tensor, Tensor> embed_tokens;
    [ComponentName(Name = "layers")] private readonly ModuleList<LlamaDecoderLayer> _layers = new();
    private Module<Tensor, Tensor> norm;
    private readonly double? embedScale;

    public LlamaModel(LlamaConfig config, ScalarType dtype, Device device) : base(nameof(LlamaModel))
    {
        embed_tokens = Embedding(config.VocabSize, config.HiddenSize, device: device, dtype: dtype);
        for (var i = 0; i < config.NumHiddenLayers; i++) _layers.append(new LlamaDecoderLayer(config, i, dtype, device));
        norm = GemmaRMSNorm.For(config, config.HiddenSize, dtype, device);
        if (config.Family.ScaledEmbeddings) embedScale = Math.Sqrt(config.HiddenSize);
        RegisterComponents();
    }

    public ModuleList<LlamaDecoderLayer> layers => _layers;

    /// <summary>The embedding table (also the output projection when tied): embed_tokens' registered weight.</summary>
    public Tensor embed_weight => embed_tokens.get_parameter("weight")
        ?? throw new InvalidOperationException($"model.embed_tokens is a {embed_tokens.TypeName()} without a 'weight' parameter");

    /// <summary>The table of a plain embedding (a TorchSharp Embedding), or null where embed_tokens was replaced.</summary>
    public Tensor? plain_embed_weight => embed_tokens is TorchSharp.Modules.Embedding ? embed_tokens.get_parameter("weight") : null;

    /// <summary>
    /// Token embeddings; Gemma's are multiplied by √hidden_size rounded to the weights' dtype, as transformers does.
    /// <paramref name="lookup"/> (table, ids) replaces a plain embedding's lookup (<see cref="plain_embed_weight"/>) where it
    /// returns a tensor.
    /// </summary>
    public Tensor embed(Tensor inputIds, Func<Tensor, Tensor, Tensor?>? lookup = null)
    {
        Tensor Lookup() => (lookup is not null && plain_embed_weight is { } table ? lookup(table, inputIds) : null) ?? embed_tokens.call(inputIds);
        if (embedScale is not double scale) return Lookup();
        using var scope = NewDisposeScope();
        var e = Lookup();
        return (e * tensor(scale, e.dtype, e.device)).MoveToOuterDisposeScope();
    }

    public Tensor final_norm(Tensor h) => norm.call(h);
}
