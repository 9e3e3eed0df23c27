namespace LoRAHub.Training.Tests;

/// <summary>The built-in "full" method: served like a plugin's method, trains every parameter, saves and loads.</summary>
[Collection(GlobalRngCollection.Name)]
public class FullFineTuningTests : IDisposable
{
    private readonly string dir = Directory.CreateTempSubdirectory("lorahub-full").FullName;
    private static readonly CharTokenizer Tok = new();

    public void Dispose() => Directory.Delete(dir, recursive: true);

    private static TextDataset Data() => new(Enumerable.Range(0, 16)
        .Select(i => Tok.Encode($"{(char)('a' + i)}={(char)('b' + i)}").Append(1).ToArray())
        .Select(ids => new TokenizedExample(ids, ids)).ToList());

    [Fact]
    public void Full_is_created_like_a_plugin_method_and_unfreezes_every_parameter()
    {
        // The host creates methods through their public parameterless constructor.
        var method = (IAdapterMethod)Activator.CreateInstance(typeof(FullFineTuning))!;
        Assert.Equal("full", method.Name);
        Assert.IsType<FullFineTuningOptions>(method.CreateDefaultOptions());

        using var model = new TinyLanguageModel(Tok.VocabSize);
        foreach (var p in model.parameters()) p.requires_grad = false;
        using var adapter = method.Attach(model, new { });
        Assert.All(model.parameters(), p => Assert.True(p.requires_grad));

        var groups = adapter.ParameterGroups(1e-3, 0.1);
        Assert.Equal(new[] { "decay", "no_decay" }, groups.Select(g => g.Name));
        Assert.All(groups[0].Parameters, p => Assert.True(p.dim() >= 2));
        Assert.All(groups[1].Parameters, p => Assert.Equal(1, p.dim()));
        Assert.Equal(0.1, groups[0].weight_decay);
        Assert.Equal(0.0, groups[1].weight_decay);
        Assert.Equal(model.parameters().Count(), groups.Sum(g => g.Parameters.Count));
        Assert.Equal(model.parameters().Sum(p => p.numel()), adapter.ModelParameterCount);
        Assert.Throws<NotSupportedException>(() => adapter.Enabled = false);
    }

    [Fact]
    public void A_trained_checkpoint_loads_onto_a_fresh_model_exactly()
    {
        var method = new FullFineTuning();
        using var trained = new TinyLanguageModel(Tok.VocabSize, seed: 0);
        using var adapter = method.Attach(trained, new FullFineTuningOptions());
        var options = new TrainerOptions
        {
            OutputDir = Path.Combine(dir, "run"), MaxSteps = 4, BatchSize = 4, LearningRate = 1e-2, ShowProgress = false, LogEvery = 0,
        };
        var result = new Trainer(trained, adapter, options).Train(Data());
        var saved = Path.Combine(result.LastCheckpoint!, Checkpoints.CheckpointManager.AdapterFolder);

        using var fresh = new TinyLanguageModel(Tok.VocabSize, seed: 1);
        Assert.False(trained.state_dict()["lm_head.weight"].allclose(fresh.state_dict()["lm_head.weight"], rtol: 0, atol: 0));
        using var loaded = method.Load(fresh, saved);
        var expected = trained.state_dict();
        foreach (var (name, value) in fresh.state_dict())
            Assert.True(expected[name].allclose(value, rtol: 0, atol: 0), $"{name} differs after Load");
        Assert.Same(method, loaded.Method);
    }

    [Fact]
    public void Loading_onto_a_different_model_names_the_tensor_and_shapes()
    {
        var method = new FullFineTuning();
        using var small = new TinyLanguageModel(Tok.VocabSize, hidden: 8);
        using (var adapter = method.Attach(small, new FullFineTuningOptions())) adapter.Save(Path.Combine(dir, "small"));

        using var wide = new TinyLanguageModel(Tok.VocabSize, hidden: 16);
        var e = Assert.Throws<AdapterConfigurationException>(() => method.Load(wide, Path.Combine(dir, "small")));
        Assert.Contains("has shape [", e.Message);
        Assert.Contains("weight", e.Message);

        var missing = Assert.Throws<AdapterConfigurationException>(() => method.Load(wide, Path.Combine(dir, "nothing-here")));
        Assert.Contains(FullFineTuning.WeightsFile, missing.Message);
    }
}
