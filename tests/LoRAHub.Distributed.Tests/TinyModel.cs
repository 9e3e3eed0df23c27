using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.Distributed.Tests;


/// <summary>The model the data-parallel tests train: Training's tiny LM without dropout (so ranks and batch splits agree to 1e-5).</summary>
public static class TinyModel
{
    public static TinyLanguageModel Create() => new(32, dropout: 0);

    /// <summary>Rows of unequal lengths whose prompts (masked with -100) have unequal lengths too.</summary>
    public static TextDataset Rows(int count = 48, int vocab = 32, int seed = 5)
    {
        var rng = new Random(seed);
        var rows = new List<TokenizedExample>();
        for (var i = 0; i < count; i++)
        {
            var length = rng.Next(4, 14);
            var prompt = rng.Next(1, length - 2);
            var ids = Enumerable.Range(0, length).Select(_ => rng.Next(2, vocab)).ToArray();
            rows.Add(new TokenizedExample(ids, ids.Select((t, j) => j < prompt ? TokenizedExample.IgnoreIndex : t).ToArray()));
        }
        return new TextDataset(rows);
    }
}

/// <summary>The methods the multi-process tests train with.</summary>
public static class TestMethods
{
    /// <summary>"full" (<see cref="FullAdapter"/>) or "galore" (the plugin, projecting the MLP matrix at rank 4, refreshed every 2 steps).</summary>
    public static IAdapter Attach(TinyLanguageModel model, string method) => method switch
    {
        "full" => new FullAdapter(model),
        "galore" => new LoRAHub.Plugins.GaLore.GaLoreMethod().Attach(model,
            new LoRAHub.Plugins.GaLore.GaLoreOptions { rank = 4, update_proj_gap = 2, scale = 0.25, target_modules = ["proj"] }),
        _ => throw new ArgumentException($"unknown test method {method}"),
    };
}

/// <summary>Every parameter trains (the method named "full", so the trainer shards its optimizer state by default).</summary>
public sealed class FullAdapter(nn.Module model) : IAdapter, IAdapterMethod
{
    public IAdapterMethod Method => this;
    public object Options => new();
    public bool Enabled { get; set; } = true;
    public long ModelParameterCount => model.parameters().Sum(p => p.numel());
    public string Name => "full";
    public string Description => "all parameters";
    public Type OptionsType => typeof(object);
    public object CreateDefaultOptions() => new();
    public IAdapter Attach(IAdaptableModel m, object options) => this;
    public IAdapter Load(IAdaptableModel m, string directory) => this;

    // Two groups (decay / no decay) so that sharding splits groups unevenly.
    public IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay)
    {
        var all = model.parameters().Where(p => p.requires_grad).Select(p => (Tensor)p).ToList();
        return [new ParamGroup(all.Where(p => p.dim() >= 2), learningRate, weightDecay, "decay"), new ParamGroup(all.Where(p => p.dim() < 2), learningRate, 0, "no_decay")];
    }

    public IReadOnlyDictionary<string, Tensor> StateDict() => model.state_dict();

    public void Save(string directory)
    {
        Directory.CreateDirectory(directory);
        torchx.save_safetensors(model.state_dict(), Path.Combine(directory, "model.safetensors"));
    }

    public void Dispose() { }
}
