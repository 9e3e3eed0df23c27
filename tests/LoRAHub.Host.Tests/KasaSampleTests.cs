using LoRAHub.Host.Commands;

namespace LoRAHub.Host.Tests;

/// <summary>
/// End to end: samples/KasaVariant (a LoRA variant on the tuner kit, built out of tree against the host's assemblies)
/// dropped on LORAHUB_PLUGIN_PATH, trained by name from a script, saved in PEFT's format and loaded back by folder.
/// </summary>
public sealed class KasaSampleTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    private const string Script = ScriptModels.Mlp + """
        torchx.manual_seed(0);
        var x = torch.randn([32, 8]);
        var y = x.sum(dim: 1, keepdim: true);
        torchx.manual_seed(1);
        var model = new Mlp(8, 8);
        var adapter = Method("kasa").Attach(Adaptable(model, "fc2"), new { r = 2, lora_alpha = 4, target_modules = new[] { "fc1" } });
        Output(adapter.TrainableParametersReport());
        Fit(model, adapter, x, y, 0.02);
        Tensor Predict(Mlp m) { using var _ = torch.no_grad(); return m.call(x); }
        var tuned = Predict(model);
        var folder = Path.Combine(ScriptDirectory, "saved");
        adapter.Save(folder);
        Output("kasa_config saved: " + File.ReadAllText(Path.Combine(folder, "adapter_config.json")).Contains("\"kasa_config\": {"));
        torchx.manual_seed(1);
        var fresh = new Mlp(8, 8);
        var loaded = LoadAdapter(Adaptable(fresh, "fc2"), folder);
        Output($"loaded by {loaded.Method.Name}: {Predict(fresh).allclose(tuned, rtol: 1e-5, atol: 1e-6)}");
        """;

    [Fact]
    public void KaSA_sample_builds_out_of_tree_and_trains_saves_and_loads_by_name()
    {
        var repo = HostProcess.RepoRoot();
        var pluginFolder = temp.Combine("plugins", "KasaVariant");
        // The test's output folder holds the host's assemblies, as an installed host's artifacts/host does.
        var build = HostProcess.Run("dotnet", ["build", Path.Combine(repo, "samples", "KasaVariant", "KasaVariant.csproj"), "-c", "Debug",
            $"-p:LoRAHubHome={AppContext.BaseDirectory}", "-o", pluginFolder, "--nologo", "-v", "q", "-clp:ErrorsOnly"], repo, []);
        Assert.True(build.Code == 0, build.Output);
        var script = temp.Write("kasa.csx", Script);

        var run = HostProcess.Run("dotnet", [typeof(LoRAHubCli).Assembly.Location, "run", script], temp.Path, new()
        {
            ["LORAHUB_PLUGIN_PATH"] = temp.Combine("plugins"),
            ["LORAHUB_SCRIPT_CACHE"] = temp.Combine("cache"),
        });

        Assert.True(run.Code == 0, run.Output);
        var lines = run.Output.ReplaceLineEndings("\n").Split('\n');
        // A (2×8) + B (8×2) + lora_diag (2) of 8*8+8 + 8+1 = 81 base parameters.
        Assert.Contains("trainable params: 34 || all params: 115 || trainable%: 29.5652", lines);
        var first = float.Parse(lines.Single(l => l.StartsWith("loss 0 ")).Split(' ')[2], System.Globalization.CultureInfo.InvariantCulture);
        var last = float.Parse(lines.Single(l => l.StartsWith("loss 29 ")).Split(' ')[2], System.Globalization.CultureInfo.InvariantCulture);
        Assert.True(last < first, $"loss {first} -> {last}");
        Assert.Contains("kasa_config saved: True", lines);
        Assert.Contains("loaded by kasa: True", lines);
    }
}
