using LoRAHub.Models;
using LoRAHub.Models.Llama;
using LoRAHub.TorchExtensions.Modules;

namespace LoRAHub.Conformance.Tests;

/// <summary>The Models suite's tiny Llama (2 layers, hidden 32, vocabulary 64) and the helpers every check shares.</summary>
internal static class Fixture
{
    public static string LlamaDir => Path.Combine(RepoRoot(), "tests", "LoRAHub.Models.Tests", "fixtures", "llama");

    public static LlamaForCausalLM Base(ScalarType dtype = ScalarType.Float32) => PretrainedModel.LoadLlama(LlamaDir, dtype);

    public static Tensor Ids(long batch = 2, long length = 8, long seed = 7)
    {
        torchx.manual_seed(seed);
        return randint(64, [batch, length]);
    }

    /// <summary>fp32 logits without autograd.</summary>
    public static Tensor Logits(ICausalLanguageModel model, Tensor ids)
    {
        using var _ = no_grad();
        return model.Forward(ids).to(ScalarType.Float32);
    }

    /// <summary>The parameters the adapter trains (every optimizer group).</summary>
    public static List<Tensor> Trainable(IAdapter adapter) => adapter.ParameterGroups(1e-3, 0).SelectMany(g => g.Parameters).ToList();

    /// <summary>Moves every trainable parameter off its init (many inits are no-ops: B = 0, E = 0), so checks see a real adapter.</summary>
    public static void Perturb(IAdapter adapter, long seed = 11)
    {
        torchx.manual_seed(seed);
        using var _ = no_grad();
        foreach (var p in Trainable(adapter)) p.add_(randn_like(p).mul(0.2));
    }

    /// <summary>
    /// The model the adapter's base output must equal: for a method that quantizes on attach, the fixture with each 4-bit
    /// layer replaced by a dense Linear holding its dequantized weight; otherwise the fixture as loaded.
    /// </summary>
    public static LlamaForCausalLM Reference(MethodCase method, ICausalLanguageModel attached)
    {
        var reference = Base(attached.DType);
        if (!method.Quantizes) return reference;
        foreach (var (name, module) in attached.Root.named_modules().ToList())
        {
            if (module is not Linear4bit q) continue;
            var path = name.EndsWith(".base_layer", StringComparison.Ordinal) ? name[..^".base_layer".Length] : name;
            reference.replace_submodule(path, BaseTuner<LoraLinear>.Dense(q, q.compute_dtype));
        }
        return reference;
    }

    /// <summary>Paths of adapter layers in the model.</summary>
    public static List<string> AdapterLayers(ICausalLanguageModel model) =>
        model.Root.named_modules().Where(m => m.module is TunerLayer).Select(m => m.name).ToList();

    public static string Temp()
    {
        var dir = Path.Combine(Path.GetTempPath(), "lorahub-conformance-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        return dir;
    }

    public static void Close(Tensor expected, Tensor actual, double atol, string what)
    {
        var diff = (expected - actual).abs().max().item<float>();
        Assert.True(diff <= atol, $"{what}: max |difference| {diff:G3} > {atol:G3}");
    }

    private static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "LoRAHub.sln"))) dir = dir.Parent;
        return dir?.FullName ?? throw new DirectoryNotFoundException("LoRAHub.sln not found above " + AppContext.BaseDirectory);
    }
}
