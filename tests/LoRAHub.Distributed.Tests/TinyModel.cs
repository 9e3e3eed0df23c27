namespace LoRAHub.Distributed.Tests;


/// <summary>
/// The model the data-parallel tests train: Training's tiny LM, by default without dropout (so ranks and batch splits
/// agree to 1e-5).
/// </summary>
public static class TinyModel
{
    public static TinyLanguageModel Create(double dropout = 0) => new(32, dropout: dropout);

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
    /// <summary>"full" (the built-in <see cref="FullFineTuning"/>: decay and no-decay groups, so sharding splits groups unevenly) or "galore" (the plugin, projecting the MLP matrix at rank 4, refreshed every 2 steps).</summary>
    public static IAdapter Attach(IAdaptableModel model, string method) => method switch
    {
        "full" => new FullFineTuning().Attach(model, new FullFineTuningOptions()),
        "galore" => new LoRAHub.Plugins.GaLore.GaLoreMethod().Attach(model,
            new LoRAHub.Plugins.GaLore.GaLoreOptions { rank = 4, update_proj_gap = 2, scale = 0.25, target_modules = ["proj"] }),
        _ => throw new ArgumentException($"unknown test method {method}"),
    };
}
