namespace LoRAHub.QLoRA.Tests;

/// <summary>cpu by default, cuda when LORAHUB_TEST_DEVICE=cuda (the GPU machine runs the same tests that way).</summary>
public static class TestDevice
{
    public static readonly Device Current = Device.Parse(Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") ?? "cpu");

    public static bool IsCuda => Current.IsCuda;
}
