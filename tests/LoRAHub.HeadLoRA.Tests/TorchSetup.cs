using System.Runtime.CompilerServices;

namespace LoRAHub.HeadLoRA.Tests;

internal static class TorchSetup
{
    /// <summary>Loads libtorch before any test touches TorchSharp (LORAHUB_LIBTORCH picks an installed PyTorch's on the GPU machine).</summary>
    [ModuleInitializer]
    internal static void Initialize() => TorchRuntime.Initialize();
}
