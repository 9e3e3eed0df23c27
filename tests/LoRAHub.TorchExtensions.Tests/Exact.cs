namespace LoRAHub.TorchExtensions.Tests;

/// <summary>PyTorch's torch.equal (TorchSharp's equal is the elementwise eq): same shape and every element equal.</summary>
internal static class Exact
{
    public static bool Equal(Tensor a, Tensor b)
    {
        if (!a.shape.SequenceEqual(b.shape)) return false;
        using var scope = NewDisposeScope();
        return a.eq(b).all().item<bool>();
    }
}
