using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Models.Llama;

// Untying and re-tying the output head for adapters (PEFT's modules_to_save=["lm_head"] and trainable_token_indices
// on a model with tie_word_embeddings): transformers' tied models own an lm_head module sharing the embedding's
// parameter; ours compute logits with the embedding table directly until an adapter asks for the module.
public sealed partial class LlamaForCausalLM : ITiedOutputHead
{
    public string InputEmbeddingsPath => "model.embed_tokens";

    public string OutputHeadPath => "lm_head";

    public bool OutputHeadTied => Config.TieWordEmbeddings;

    public void UntieOutputHead()
    {
        if (!Config.TieWordEmbeddings) return;
        var weight = _model.embed_weight as Parameter
            ?? throw new InvalidOperationException("model.embed_tokens.weight is not a Parameter; the output head cannot share it");
        var head = nn.Linear(weight, null);
        head.train(training);
        lm_head = head;
        register_module("lm_head", head);
        Config.TieWordEmbeddings = false;
    }

    public bool TryRetieOutputHead()
    {
        if (Config.TieWordEmbeddings) return true;
        if (lm_head is not Linear head || head.bias is not null || !ReferenceEquals(head.weight, _model.embed_weight)) return false;
        register_module("lm_head", null!); // removes the registration (see torchx's replace_submodule)
        lm_head = null;
        Config.TieWordEmbeddings = true;
        // The module must not free the embedding's parameter it still points at.
        head.replace_parameter("weight", new Parameter(empty(0), requires_grad: false));
        head.Dispose();
        return true;
    }
}
