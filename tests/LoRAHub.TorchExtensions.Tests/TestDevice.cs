using System.Runtime.CompilerServices;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The device the suite runs on: cpu by default, cuda when LORAHUB_TEST_DEVICE=cuda (the GPU machine runs the
/// same tests that way).
/// </summary>
public static class TestDevice
{
    public static readonly Device Current = new(Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") ?? "cpu");

    public static bool IsCuda => Current.type == DeviceType.CUDA;
}

internal static class TestSetup
{
    /// <summary>Chooses libtorch (LORAHUB_LIBTORCH) before any test touches TorchSharp, as the host does at start.</summary>
    [ModuleInitializer]
    internal static void Initialize() => TorchRuntime.Initialize();
}

/// <summary>
/// Tests that use process-wide state — the CPU generator's sequence, the live-tensor count, resident memory — run in
/// this collection, alone, after the parallel ones.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class Serial
{
    public const string Name = "Serial";
}
