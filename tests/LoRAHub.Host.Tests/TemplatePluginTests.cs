using LoRAHub.Host.Commands;

namespace LoRAHub.Host.Tests;

/// <summary>
/// End to end as a plugin author: install templates/MethodPlugin into a private template store, create a plugin from it
/// outside the solution, build it against the built host's assemblies, drop it in a plugin folder and use it by name
/// from a script, with the host untouched.
/// </summary>
public sealed class TemplatePluginTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    private const string Script = ScriptModels.Mlp + """
        // The template's method scales the inputs of both Linear layers.
        torchx.manual_seed(0);
        var model = new Mlp(4, 16);
        var x = torch.randn([32, 4]);
        var y = x.sum(dim: 1, keepdim: true) * 3.0;
        Tensor Predict() { using var _ = torch.no_grad(); return model.call(x); }
        var basePrediction = Predict();
        var adapter = Method("foo").Attach(Adaptable(model), new { target_modules = new[] { "fc1", "fc2" }, note = "kept" });
        Output(adapter.TrainableParametersReport());
        Fit(model, adapter, x, y, 0.05);
        var tuned = Predict();
        using (adapter.DisableAdapter()) Output($"disabled is base: {Predict().allclose(basePrediction)}");
        adapter.Merge();
        Output($"merged matches: {Predict().allclose(tuned, rtol: 1e-4, atol: 1e-5)}");
        adapter.Unmerge();
        var folder = Path.Combine(ScriptDirectory, "saved");
        adapter.Save(folder);
        Output("saved: " + string.Join(",", Directory.GetFiles(folder).Select(Path.GetFileName).Order()));
        using (var config = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "adapter_config.json"))))
            Output($"config: peft_type {config.RootElement.GetProperty("peft_type")}, note {config.RootElement.GetProperty("note")}");
        adapter.Dispose();
        Output($"unloaded is base: {Predict().allclose(basePrediction, rtol: 1e-4, atol: 1e-5)}"); // merge + unmerge round within float tolerance
        // The folder says which method wrote it (Claims): loading needs no method name.
        var loaded = LoadAdapter(Adaptable(model), folder);
        Output($"loaded by {loaded.Method.Name}: {Predict().allclose(tuned, rtol: 1e-5, atol: 1e-6)}");
        Output($"loaded note: {loaded.Options.GetType().GetProperty("Note")!.GetValue(loaded.Options)}");
        loaded.MergeAndUnload();
        Output($"merge_and_unload: {Predict().allclose(tuned, rtol: 1e-4, atol: 1e-5)}, plain: {model.named_modules().All(m => m.module.GetType().Name != "FooLayer")}");
        """;

    [Fact]
    public void A_plugin_made_from_the_template_builds_out_of_tree_and_runs_by_name()
    {
        var repo = HostProcess.RepoRoot();
        var dotnetEnv = new Dictionary<string, string> { ["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1", ["DOTNET_NOLOGO"] = "1" };
        // A private template store (--debug:custom-hive), so the user's installed templates are untouched.
        var hive = temp.Combine("hive");
        var install = HostProcess.Run("dotnet", ["new", "install", Path.Combine(repo, "templates", "MethodPlugin"), "--debug:custom-hive", hive], temp.Path, dotnetEnv);
        Assert.True(install.Code == 0, install.Output);
        // The test's output folder holds the host's assemblies (contract, tuner kit, extensions) as an installed host does.
        var project = temp.Combine("src", "Foo");
        var create = HostProcess.Run("dotnet", ["new", "lorahub-method", "-n", "Foo", "-o", project, "--lorahub-home", AppContext.BaseDirectory,
            "--debug:custom-hive", hive], temp.Path, dotnetEnv);
        Assert.True(create.Code == 0, create.Output);
        Assert.True(File.Exists(Path.Combine(project, "Foo.csproj")), create.Output);
        // An author's new option, marked [ConfigKey] and nothing else: Save must write it and Load read it back.
        var optionsFile = Path.Combine(project, "FooOptions.cs");
        const string taskType = "public string TaskType { get; set; } = \"CAUSAL_LM\";";
        Assert.Contains(taskType, File.ReadAllText(optionsFile));
        File.WriteAllText(optionsFile, File.ReadAllText(optionsFile).Replace(taskType, taskType + "\n    [ConfigKey(\"note\")] public string? Note { get; set; }"));

        var pluginFolder = temp.Combine("plugins", "Foo");
        var build = HostProcess.Run("dotnet", ["build", Path.Combine(project, "Foo.csproj"), "-c", "Release", "-o", pluginFolder, "--nologo", "-v", "q", "-clp:ErrorsOnly"],
            project, dotnetEnv);
        Assert.True(build.Code == 0, build.Output);
        // Nothing the host provides is shipped: the plugin folder holds the plugin alone.
        Assert.DoesNotContain(Directory.GetFiles(pluginFolder).Select(Path.GetFileName), f => f!.StartsWith("LoRAHub.", StringComparison.Ordinal) ||
            f.StartsWith("TorchSharp", StringComparison.Ordinal) || f.Contains("torch", StringComparison.OrdinalIgnoreCase));

        var script = temp.Write("use.csx", Script);
        var run = HostProcess.Run("dotnet", [typeof(LoRAHubCli).Assembly.Location, "run", script], temp.Path, new()
        {
            ["LORAHUB_PLUGIN_PATH"] = temp.Combine("plugins"),
            ["LORAHUB_SCRIPT_CACHE"] = temp.Combine("cache"),
        });

        Assert.True(run.Code == 0, run.Output);
        var lines = run.Output.ReplaceLineEndings("\n").Split('\n');
        // Scales of fc1's 4 and fc2's 16 inputs, of 4*16+16 + 16+1 = 97 base parameters.
        Assert.Contains("trainable params: 20 || all params: 117 || trainable%: 17.0940", lines);
        var first = float.Parse(lines.Single(l => l.StartsWith("loss 0 ")).Split(' ')[2], System.Globalization.CultureInfo.InvariantCulture);
        var last = float.Parse(lines.Single(l => l.StartsWith("loss 29 ")).Split(' ')[2], System.Globalization.CultureInfo.InvariantCulture);
        Assert.True(last < first * 0.8, $"loss {first} -> {last}");
        Assert.Contains("disabled is base: True", lines);
        Assert.Contains("merged matches: True", lines);
        Assert.Contains("saved: adapter_config.json,adapter_model.safetensors", lines);
        Assert.Contains("config: peft_type FOO, note kept", lines);
        Assert.Contains("unloaded is base: True", lines);
        Assert.Contains("loaded by foo: True", lines);
        Assert.Contains("loaded note: kept", lines);
        Assert.Contains("merge_and_unload: True, plain: True", lines);
    }
}
