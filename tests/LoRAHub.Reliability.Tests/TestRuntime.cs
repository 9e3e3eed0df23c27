using System.Runtime.CompilerServices;

namespace LoRAHub.Reliability.Tests;

internal static class TestRuntime
{
    /// <summary>Loads the libtorch that LORAHUB_LIBTORCH names (CUDA on the GPU machine) before anything touches TorchSharp.</summary>
    [ModuleInitializer]
    internal static void Initialize() => TorchRuntime.Initialize();
}

/// <summary>Tests that seed libtorch's process-wide generator or measure the process run one at a time.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class Serial
{
    public const string Name = "serial";
}
