using LoRAHub.Abstractions;
using LoRAHub.Host.Everyday;
using LoRAHub.Host.Plugins;
using LoRAHub.Host.Serving;
using LoRAHub.Models;
using LoRAHub.Models.Generation;
using LoRAHub.TorchExtensions;
using Microsoft.Extensions.Logging.Abstractions;
using TorchSharp;

namespace LoRAHub.Host.Tests;

/// <summary>
/// serve's worker (InferenceEngine) and its AdapterHub driven directly: a batch never needs more adapters than may be
/// loaded (the rest wait, in order); an adapter that cannot load fails its own rows only; an adapter that rewrites the
/// base weights (full fine-tuning, GaLore) is refused beside the base model, and a failed unload leaves the hub's
/// bookkeeping as it was.
/// </summary>
[Collection(EmbeddedModelCollection.Name)]
public sealed class ServeBatchingTests(EmbeddedModelFixture fixture) : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    private static CompletionJob Job(LoadedModel model, string adapter) =>
        new(Prompt.FromText("copy abcd = ").Encode(model.Tokenizer), new GenerationOptions { MaxNewTokens = 4 }, adapter, [], CancellationToken.None);

    /// <summary>Submits the jobs while the worker is held, so that they all wait for one batch, then lets it go.</summary>
    private static async Task RunTogether(InferenceEngine engine, IReadOnlyList<CompletionJob> jobs)
    {
        using var gate = new ManualResetEventSlim();
        var held = engine.OnWorker(_ => gate.Wait(TimeSpan.FromSeconds(60)));
        foreach (var job in jobs) engine.Submit(job);
        gate.Set();
        Assert.True(await held);
        await Task.WhenAny(Task.WhenAll(jobs.Select(j => (Task)j.Completion.Task)), Task.Delay(TimeSpan.FromSeconds(120)));
    }

    [Fact]
    public async Task A_batch_takes_no_more_distinct_adapters_than_may_be_loaded_and_the_rest_wait_in_order()
    {
        using var model = LoadedModel.Load(fixture.BaseModel);
        using var hub = new AdapterHub(model.Model, fixture.Methods, maxLoaded: 1);
        hub.Register("a", fixture.AdapterA);
        hub.Register("b", fixture.AdapterB);
        using var engine = new InferenceEngine(model, hub, new ServeOptions { BatchWait = TimeSpan.Zero }, NullLogger.Instance);
        var jobs = new[] { Job(model, "a"), Job(model, "b"), Job(model, IAdapterSet.BaseName), Job(model, "a"), Job(model, "b") };

        await RunTogether(engine, jobs);

        foreach (var job in jobs)
            Assert.True(job.Completion.Task.IsCompletedSuccessfully, $"{job.Adapter}: {job.Completion.Task.Exception?.InnerException?.Message ?? "not finished"}");
        // a with the base and a again, then both b rows: two batches, at most one adapter (and the base) each.
        Assert.Equal(2, engine.Batches);
        Assert.Equal(2, engine.MostAdaptersInOneBatch);
        Assert.Equal(3, engine.LargestBatch);
        Assert.Equal(["b"], engine.Loaded);
        Assert.Equal((await jobs[1].Completion.Task).Text, (await jobs[4].Completion.Task).Text);
        Assert.NotEqual((await jobs[0].Completion.Task).Text, (await jobs[1].Completion.Task).Text);
    }

    [Fact]
    public async Task An_adapter_that_cannot_reload_fails_its_own_rows_only()
    {
        using var model = LoadedModel.Load(fixture.BaseModel);
        using var hub = new AdapterHub(model.Model, fixture.Methods, maxLoaded: 2);
        var copy = temp.Combine("c");
        Directory.CreateDirectory(copy);
        foreach (var file in Directory.GetFiles(fixture.AdapterB)) File.Copy(file, Path.Combine(copy, Path.GetFileName(file)));
        hub.Register("a", fixture.AdapterA);
        hub.Register("b", fixture.AdapterB);
        hub.Register("c", copy);
        hub.Prepare(["c"]);
        Directory.Delete(copy, recursive: true);
        hub.Prepare(["a", "b"]); // c is evicted, and cannot come back
        Assert.DoesNotContain("c", hub.Loaded);
        using var engine = new InferenceEngine(model, hub, new ServeOptions { BatchWait = TimeSpan.Zero }, NullLogger.Instance);
        var jobs = new[] { Job(model, IAdapterSet.BaseName), Job(model, "b"), Job(model, "c") };

        await RunTogether(engine, jobs);

        Assert.True(jobs[0].Completion.Task.IsCompletedSuccessfully, jobs[0].Completion.Task.Exception?.InnerException?.Message);
        Assert.True(jobs[1].Completion.Task.IsCompletedSuccessfully, jobs[1].Completion.Task.Exception?.InnerException?.Message);
        var error = Assert.IsType<OpenAiError>(jobs[2].Completion.Task.Exception?.InnerException);
        Assert.Equal(503, error.Status);
        Assert.Equal("adapter_load_failed", error.Code);
        Assert.Contains($"the adapter 'c' cannot be loaded from {copy}", error.Message);
        Assert.Contains("b", engine.Loaded);
    }

    private string FullFineTune()
    {
        var folder = temp.Combine("full");
        using var model = PretrainedModel.LoadLlama(fixture.BaseModel);
        torchx.manual_seed(4);
        using var adapter = new LoRAHub.Training.FullFineTuning().Attach(model, null!);
        using (torch.no_grad())
            foreach (var (key, p) in model.named_parameters())
                if (key.Contains("mlp")) p.add_(torch.randn(p.shape) * 0.2);
        adapter.Save(folder);
        return folder;
    }

    [Fact]
    public void A_server_refuses_an_adapter_that_rewrites_the_base_weights_naming_the_cause_and_the_fix()
    {
        var full = FullFineTune();
        var methods = new PluginLoader { BuiltInMethods = [new LoRAHub.Training.FullFineTuning()] }.Load([]);
        using var model = LoadedModel.Load(fixture.BaseModel);
        using var hub = new AdapterHub(model.Model, methods);

        var e = Assert.Throws<ArgumentException>(() => hub.Register("full", full));

        Assert.Contains($"adapter 'full' ({full}) cannot be served beside the base model: full rewrites the base weights themselves", e.Message);
        Assert.Contains("loraHub merge", e.Message);
        Assert.Empty(hub.Registered);
        // The base model is untouched: a base batch still prepares.
        Assert.Null(hub.Prepare([IAdapterSet.BaseName]).Scope);

        // The advice works: merged, the weights are a model folder of their own with the trained weights.
        var merged = temp.Combine("merged");
        AdapterMerge.Run(methods, fixture.BaseModel, full, merged);
        using var own = LoadedModel.Load(merged);
        var trained = own.Model.Root.named_parameters().First(p => p.name.Contains("mlp")).parameter;
        var original = model.Model.Root.named_parameters().First(p => p.name.Contains("mlp")).parameter;
        Assert.False(trained.allclose(original), "the merged folder holds the base weights, not the trained ones");
    }

    [Fact]
    public void A_failed_unload_leaves_the_adapter_registered_and_loaded()
    {
        var full = FullFineTune();
        var methods = new PluginLoader { BuiltInMethods = [new LoRAHub.Training.FullFineTuning()] }.Load([]);
        using var model = LoadedModel.Load(fixture.BaseModel);
        using var hub = new AdapterHub(model.Model, methods, allowBaseRewrites: true);
        hub.Register("full", full);
        hub.Prepare(["full"]);

        Assert.Throws<NotSupportedException>(() => hub.Remove("full"));

        Assert.Equal(["full"], hub.Loaded);
        Assert.True(hub.Registered.ContainsKey("full"));
        Assert.False(hub.CanMix);
    }
}
