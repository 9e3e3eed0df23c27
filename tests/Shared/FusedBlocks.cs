using FX = LoRAHub.TorchExtensions.torchx.nn.functional;

namespace LoRAHub.Tests.Shared;

/// <summary>The fused LoRA blocks' switches for tests that compare the fused path with the composite one.</summary>
public static class FusedBlocks
{
    /// <summary>Runs <paramref name="f"/> with both fused blocks switched as given (on the CPU too), restoring the switches after.</summary>
    public static T WithFused<T>(bool on, Func<T> f)
    {
        var (mlp, qkv, cpu) = (FX.Fused.LoraMlp, FX.Fused.LoraQkv, FX.Fused.LoraBlocksOnCpu);
        FX.Fused.LoraMlp = FX.Fused.LoraQkv = on;
        FX.Fused.LoraBlocksOnCpu = true;
        try
        {
            return f();
        }
        finally
        {
            (FX.Fused.LoraMlp, FX.Fused.LoraQkv, FX.Fused.LoraBlocksOnCpu) = (mlp, qkv, cpu);
        }
    }
}
