namespace LoRAHub.QLoRA.Tests;

/// <summary>cpu by default, cuda when LORAHUB_TEST_DEVICE=cuda (the GPU machine runs the same tests that way).</summary>
public static class TestDevice
{
    public static readonly Device Current = Parse(Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") ?? "cpu");

    public static bool IsCuda => Current.type == DeviceType.CUDA;

    // "cuda" means cuda:0, as a tensor's device reports it. TorchSharp's Device has no value equality: compare ToString().
    private static Device Parse(string text) => text.Trim().ToLowerInvariant() is "cuda" ? new Device(DeviceType.CUDA, 0) : new Device(text);
}
