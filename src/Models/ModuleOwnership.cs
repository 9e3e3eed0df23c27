using static TorchSharp.torch;

namespace LoRAHub.Models;

internal static class ModuleOwnership
{
    /// <summary>
    /// A model's parameters and buffers belong to the model, not to a dispose scope the caller happens to have open while
    /// building it (TorchSharp registers some new tensors, e.g. a native Embedding's weight, on the current scope).
    /// </summary>
    public static void DetachParametersFromDisposeScope(this nn.Module module)
    {
        foreach (var (_, p) in module.named_parameters()) p.DetachFromDisposeScope();
        foreach (var (_, b) in module.named_buffers()) b.DetachFromDisposeScope();
    }
}
