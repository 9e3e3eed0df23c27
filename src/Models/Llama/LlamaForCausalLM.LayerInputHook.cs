using LoRAHub.Abstractions;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Models.Llama;

// Data parallelism's overlap point (ILayerInputHook): hook point i < LayerCount is decoder layer i's input, hook point
// LayerCount the final norm's input (the head: final norm and an untied lm_head; a tied head is the embedding's weight,
// complete only at the end of backward).
public sealed partial class LlamaForCausalLM : ILayerInputHook
{
    public Func<int, Tensor, Tensor>? LayerInputHook { get; set; }

    public IReadOnlyList<IReadOnlyList<nn.Module>> HookedLayers
    {
        get
        {
            var layers = _model.layers.Select(l => (IReadOnlyList<nn.Module>)[l]).ToList();
            var head = new List<nn.Module>(_model.named_children().Where(c => c.name == "norm").Select(c => c.module));
            if (lm_head is not null) head.Add(lm_head);
            layers.Add(head);
            return layers;
        }
    }

    // The hidden states layer `index` (LayerCount: the final norm) reads: the hook's result where one is set and autograd
    // records; the replaced tensor is freed (the hook's result stands for it).
    private Tensor HookLayerInput(int index, Tensor h)
    {
        if (LayerInputHook is not { } hook || !is_grad_enabled() || !h.requires_grad) return h;
        var hooked = hook(index, h);
        if (!ReferenceEquals(hooked, h)) h.Dispose();
        return hooked;
    }
}
