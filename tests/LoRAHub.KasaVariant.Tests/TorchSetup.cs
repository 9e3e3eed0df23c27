using System.Runtime.CompilerServices;

// Tests build models from torch.manual_seed, and libtorch's generator is process-wide: run them one at a time.
[assembly: CollectionBehavior(DisableTestParallelization = true)]

namespace LoRAHub.KasaVariant.Tests;

internal static class TorchSetup
{
    /// <summary>Loads libtorch before any test touches TorchSharp (LORAHUB_LIBTORCH picks an installed PyTorch's on the GPU machine).</summary>
    [ModuleInitializer]
    internal static void Initialize() => TorchRuntime.Initialize();
}
