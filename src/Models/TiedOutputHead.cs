using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Models;

/// <summary>
/// The lm_head module a tied model (Llama, GPT-2) gets while an adapter needs one (<see cref="Abstractions.ITiedOutputHead"/>):
/// a bias-free Linear whose weight IS the embedding's parameter, as in transformers' tied models.
/// </summary>
internal static class TiedOutputHead
{
    /// <summary>Creates the head over <paramref name="embedding"/> and registers it on <paramref name="owner"/> as "lm_head".</summary>
    public static Linear Create(nn.Module owner, Tensor embedding, string embeddingPath)
    {
        var weight = embedding as Parameter
            ?? throw new InvalidOperationException($"{embeddingPath}.weight is not a Parameter; the output head cannot share it");
        var head = nn.Linear(weight, null);
        head.train(owner.training);
        owner.register_module("lm_head", head);
        return head;
    }

    /// <summary>
    /// Unregisters and frees <paramref name="head"/> when it still holds <paramref name="embedding"/> (not a trained copy);
    /// false, changing nothing, otherwise.
    /// </summary>
    public static bool TryRemove(nn.Module owner, nn.Module? head, Tensor embedding)
    {
        if (head is not Linear linear || linear.bias is not null || !ReferenceEquals(linear.weight, embedding)) return false;
        owner.register_module("lm_head", null!); // removes the registration (see torchx's replace_submodule)
        // The module must not free the embedding's parameter it still points at.
        linear.replace_parameter("weight", new Parameter(empty(0), requires_grad: false));
        linear.Dispose();
        return true;
    }
}
