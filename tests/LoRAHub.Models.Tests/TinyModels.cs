using LoRAHub.Models.Gpt2;
using LoRAHub.Models.Llama;

namespace LoRAHub.Models.Tests;

/// <summary>Small random models and scratch folders shared by the tests.</summary>
internal static class TinyModels
{
    public static readonly Device Device = new(Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") ?? "cpu");

    public static LlamaConfig LlamaConfig(string modelType = "llama", bool tied = false) => new()
    {
        ModelType = modelType,
        VocabSize = 64,
        HiddenSize = 32,
        IntermediateSize = 64,
        NumHiddenLayers = 2,
        NumAttentionHeads = 4,
        NumKeyValueHeads = 2,
        MaxPositionEmbeddings = 128,
        RmsNormEps = 1e-6,
        TieWordEmbeddings = tied,
    };

    public static LlamaForCausalLM Llama(string modelType = "llama", bool tied = false, long seed = 0) =>
        LlamaForCausalLM.CreateRandom(LlamaConfig(modelType, tied), ScalarType.Float32, Device, seed);

    public static Gpt2LMHeadModel Gpt2(long seed = 0) => Gpt2LMHeadModel.CreateRandom(
        new Gpt2Config { VocabSize = 64, NPositions = 64, NEmbd = 32, NLayer = 2, NHead = 4 }, ScalarType.Float32, Device, seed);

    public static Tensor Ids(long[,] ids) => torch.tensor(ids, device: Device);

    public static string TempFolder()
    {
        var path = Path.Combine(Path.GetTempPath(), "lorahub-models-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(path);
        return path;
    }

    /// <summary>PyTorch's torch.equal: same shape and the same elements (TorchSharp's equal is elementwise).</summary>
    public static bool Equal(Tensor a, Tensor b)
    {
        using var same = a.eq(b).all();
        return a.shape.SequenceEqual(b.shape) && same.item<bool>();
    }

    public static float MaxAbsDiff(Tensor a, Tensor b)
    {
        using var d = (a - b).abs().max();
        return d.item<float>();
    }
}
