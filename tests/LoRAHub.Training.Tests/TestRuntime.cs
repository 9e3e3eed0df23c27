using System.Runtime.CompilerServices;

namespace LoRAHub.Training.Tests;

internal static class TestRuntime
{
    /// <summary>Loads the libtorch that LORAHUB_LIBTORCH names (CUDA on the GPU machine) before any test touches TorchSharp.</summary>
    [ModuleInitializer]
    internal static void Initialize() => TorchRuntime.Initialize();
}

/// <summary>
/// Test classes that seed and draw from libtorch's process-wide generator (models, trainers) run one at a time,
/// as xUnit would otherwise run the classes in parallel and interleave their random numbers.
/// </summary>
[CollectionDefinition(Name)]
public sealed class GlobalRngCollection
{
    public const string Name = "libtorch global RNG";
}
