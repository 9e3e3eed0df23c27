using System.Runtime.CompilerServices;

namespace LoRAHub.Distributed.Tests;

internal static class TestRuntime
{
    /// <summary>Loads the libtorch that LORAHUB_LIBTORCH names before any test touches TorchSharp.</summary>
    [ModuleInitializer]
    internal static void Initialize() => TorchRuntime.Initialize();
}
