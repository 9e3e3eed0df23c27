namespace LoRAHub.OwnModel.Tests;

internal static class Helpers
{
    public static IAdapterMethod Method(string name) => name switch
    {
        "lora" => new LoraMethod(),
        "dora" => new DoraMethod(),
        _ => throw new ArgumentException(name),
    };

    /// <summary>The model's output as a detached copy.</summary>
    public static Tensor Forward(nn.Module<Tensor, Tensor> model, Tensor x)
    {
        using var _ = no_grad();
        return model.call(x).detach().clone();
    }

    /// <summary>Bit-identical (same shape, every element equal).</summary>
    public static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    public static double MaxDiff(Tensor a, Tensor b) => (a - b).abs().max().to(ScalarType.Float64).item<double>();

    public static bool IsAdapterKey(string name) => name.Split('.').Any(part => part.StartsWith("lora_", StringComparison.Ordinal));

    /// <summary>
    /// The model's weights under the plain model's names (PEFT's merge_and_unload on the state dict): adapter tensors
    /// dropped and the "base_layer" level removed. After Merge these are the merged weights.
    /// </summary>
    public static Dictionary<string, Tensor> PlainWeights(nn.Module model) =>
        model.state_dict().Where(kv => !IsAdapterKey(kv.Key)).ToDictionary(kv => kv.Key.Replace(".base_layer.", "."), kv => kv.Value);

    public static Dictionary<string, Tensor> Snapshot(nn.Module model) =>
        PlainWeights(model).ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());

    public static string TempDir()
    {
        var dir = Path.Combine(Path.GetTempPath(), "lorahub-ownmodel-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        return dir;
    }
}
