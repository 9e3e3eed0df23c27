using System.Text.Json;
using LoRAHub.Host.Commands;
using LoRAHub.Models;
using LoRAHub.TorchExtensions;
using TorchSharp;

namespace LoRAHub.Host.Tests;

/// <summary>
/// A shortened run of the README's main job: the embedded base model fine-tuned on rot1 through the real host and
/// the real LoRA plugin, with the exact-match metric rising from near zero.
/// </summary>
public sealed class DemoTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    [Fact]
    public void Finetune_example_raises_exact_match_with_lora()
    {
        var repo = HostProcess.RepoRoot();
        var build = HostProcess.Run("dotnet", ["build", Path.Combine(repo, "plugins", "LoRA", "LoRAHub.Plugins.LoRA.csproj"), "-c", "Release", "--nologo", "-v", "q", "-clp:ErrorsOnly", "-o", temp.Combine("plugins", "LoRA")], repo, []);
        Assert.True(build.Code == 0, build.Output);
        var output = temp.Combine("run");

        var run = HostProcess.Run("dotnet", [typeof(LoRAHubCli).Assembly.Location, "run", "--method", "lora", "--device", "cpu",
            Path.Combine(repo, "examples", "finetune.csx"), "50", "30", output], temp.Path, new()
        {
            ["LORAHUB_PLUGIN_PATH"] = temp.Combine("plugins"),
            ["LORAHUB_SCRIPT_CACHE"] = temp.Combine("cache"),
        });

        Assert.True(run.Code == 0, run.Output);
        using var result = JsonDocument.Parse(File.ReadAllText(Path.Combine(output, "result.json")));
        var before = result.RootElement.GetProperty("before").GetDouble();
        var after = result.RootElement.GetProperty("after").GetDouble();
        Assert.True(before <= 0.1, $"the base model should not know rot1 (exact match {before})\n{run.Output}");
        Assert.True(after >= 0.5, $"exact match after 50 LoRA steps: {after}\n{run.Output}");
        Assert.True(File.Exists(Path.Combine(output, "adapter", "adapter_config.json")));
        Assert.True(File.Exists(Path.Combine(output, "adapter", "adapter_model.safetensors")));
        Assert.True(File.Exists(Path.Combine(output, "merged", "model.safetensors")));

        // The README's eval line: the job's held-out words, shipped as prompt/completion records.
        var eval = HostProcess.Run("dotnet", [typeof(LoRAHubCli).Assembly.Location, "eval", Path.Combine(repo, "examples", "base-model"),
            Path.Combine(repo, "examples", "rot1-eval.jsonl"), "-a", Path.Combine(output, "adapter"), "--stop", "\n", "--json"], temp.Path, new()
        {
            ["LORAHUB_PLUGIN_PATH"] = temp.Combine("plugins"),
        });
        Assert.True(eval.Code == 0, eval.Output);
        using var scores = JsonDocument.Parse(eval.Output[eval.Output.IndexOf('{')..(eval.Output.LastIndexOf('}') + 1)]);
        Assert.Equal(200, scores.RootElement.GetProperty("exact_match_total").GetInt32());
        Assert.True(scores.RootElement.GetProperty("exact_match").GetDouble() >= 0.5, eval.Output);

        // merge_and_unload wrote an ordinary model folder: the base model's keys (no adapter wrapper keys), merged weights.
        TorchRuntime.Initialize();
        using var baseModel = PretrainedModel.LoadLlama(Path.Combine(repo, "examples", "base-model"));
        using var merged = PretrainedModel.LoadLlama(Path.Combine(output, "merged"));
        var baseWeights = baseModel.state_dict();
        var mergedWeights = merged.state_dict();
        Assert.Equal(baseWeights.Keys.Order(), mergedWeights.Keys.Order());
        const string q = "model.layers.0.self_attn.q_proj.weight";
        Assert.False(torch.equal(baseWeights[q], mergedWeights[q]).all().item<bool>(), "the merged q_proj equals the base's: nothing was folded in");
    }

    [Fact]
    public void Finetune_example_runs_the_built_in_full_method_without_any_plugin()
    {
        var repo = HostProcess.RepoRoot();
        var output = temp.Combine("run-full");
        Directory.CreateDirectory(temp.Combine("no-plugins"));

        var run = HostProcess.Run("dotnet", [typeof(LoRAHubCli).Assembly.Location, "run", "--method", "full", "--device", "cpu",
            Path.Combine(repo, "examples", "finetune.csx"), "30", "20", output], temp.Path, new()
        {
            ["LORAHUB_PLUGIN_PATH"] = temp.Combine("no-plugins"),
            ["LORAHUB_SCRIPT_CACHE"] = temp.Combine("cache"),
        });

        Assert.True(run.Code == 0, run.Output);
        using var result = JsonDocument.Parse(File.ReadAllText(Path.Combine(output, "result.json")));
        Assert.Equal("full", result.RootElement.GetProperty("method").GetString());
        Assert.Equal(30, result.RootElement.GetProperty("steps").GetInt32());
        // Full fine-tuning saves the whole model's weights; "merged" (its weights are the merged model) is an ordinary
        // Hugging Face folder of them, which generate and serve load as a model.
        Assert.True(File.Exists(Path.Combine(output, "adapter", "model.safetensors")), run.Output);
        Assert.True(File.Exists(Path.Combine(output, "merged", "config.json")), run.Output);
        Assert.True(File.Exists(Path.Combine(output, "merged", "tokenizer.json")), run.Output);
    }
}
