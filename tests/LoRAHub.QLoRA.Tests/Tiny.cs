namespace LoRAHub.QLoRA.Tests;

/// <summary>The shared tiny model, 64 wide so its weights fill whole 4-bit blocks of 64.</summary>
public static class Tiny
{
    public const int Hidden = 64;

    public static TinyModel Model(long seed = 0, ScalarType dtype = ScalarType.Float32, bool bias = false, Device? device = null) =>
        new(seed, dtype, bias, device, Hidden);

    public static Tensor Batch(long seed = 1, Device? device = null) => TinyModel.Batch(seed, device, batch: 4, length: 6);
}
