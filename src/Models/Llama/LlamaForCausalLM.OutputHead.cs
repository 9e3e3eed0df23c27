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
        lm_head = TiedOutputHead.Create(this, _model.embed_weight, InputEmbeddingsPath);
        Config.TieWordEmbeddings = false;
    }

    public bool TryRetieOutputHead()
    {
        if (Config.TieWordEmbeddings) return true;
        if (!TiedOutputHead.TryRemove(this, lm_head, _model.embed_weight)) return false;
        lm_head = null;
        Config.TieWordEmbeddings = true;
        return true;
    }
}
