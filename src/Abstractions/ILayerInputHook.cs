using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Abstractions;

/// <summary>
/// A model that lets a trainer act on the input of each of its layers in forward. Data parallelism uses it to learn,
/// during backward, when a layer's parameter gradients are complete (the identity it inserts there runs its backward
/// after the layer's), so that their all-reduce overlaps the backward of the layers below, as PyTorch DDP's does.
/// Models without it still train data-parallel; their gradients are reduced after backward.
/// </summary>
public interface ILayerInputHook
{
    /// <summary>
    /// The modules of each hooked layer, in forward order: hook point i is the input of layer i (decoder layers, then the
    /// output head: final norm and an untied lm_head). Forward must use layer i's parameters only after its input went
    /// through the hook and before layer i + 1's did. Parameters in no layer (embeddings, a tied head) are treated as
    /// complete only when backward ends.
    /// </summary>
    IReadOnlyList<IReadOnlyList<nn.Module>> HookedLayers { get; }

    /// <summary>
    /// Applied in forward, when grad mode is on and the hidden states require grad, to layer i's input (outside any
    /// gradient checkpoint of that layer); the layer then uses what it returns. Null: no hook.
    /// </summary>
    Func<int, Tensor, Tensor>? LayerInputHook { get; set; }
}
