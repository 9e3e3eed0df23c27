using System.Diagnostics;
using LoRAHub.Host.Commands;

namespace LoRAHub.Host.Tests;

/// <summary>End to end: build samples/BitFit, drop it on LORAHUB_PLUGIN_PATH and train through `loraHub run`.</summary>
public sealed class BitFitSampleTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    private const string TrainScript = ScriptModels.Mlp + """
        // BitFit adapts the MLP through its biases only.
        torchx.manual_seed(0);
        var model = new Mlp(4, 16);
        var x = torch.randn([32, 4]);
        var y = torch.randn([32, 1]) + 3.0;   // an offset the biases can learn
        var method = Method(MethodName ?? "bitfit");
        // Top-level `using var` is not allowed in scripts, so the adapter is disposed at the end.
        var adapter = method.Attach(Adaptable(model, "fc2"), new { TrainBiases = true });
        Output(adapter.TrainableParametersReport());
        var weightBefore = model.state_dict()["fc1.weight"].clone();
        Fit(model, adapter, x, y, 0.05);
        Output($"weights unchanged: {torch.equal(weightBefore, model.state_dict()["fc1.weight"]).all().item<bool>()}");
        adapter.Save(Path.Combine(ScriptDirectory, "saved"));
        adapter.Dispose();
        Output("saved: " + string.Join(",", Directory.GetFiles(Path.Combine(ScriptDirectory, "saved")).Select(Path.GetFileName).Order()));
        """;

    [Fact]
    public void BitFit_sample_trains_only_biases_through_the_host()
    {
        var repo = HostProcess.RepoRoot();
        var build = HostProcess.Run("dotnet", ["build", Path.Combine(repo, "samples", "BitFit", "BitFit.csproj"), "-c", "Debug", "--nologo", "-v", "q", "-clp:ErrorsOnly"], repo, []);
        Assert.True(build.Code == 0, build.Output);
        var pluginFolder = temp.Combine("plugins", "BitFit");
        HostProcess.CopyFolder(Path.Combine(repo, "samples", "BitFit", "bin", "Debug", "net10.0"), pluginFolder);
        var script = temp.Write("train.csx", TrainScript);

        var run = HostProcess.Run("dotnet", [typeof(LoRAHubCli).Assembly.Location, "run", script], temp.Path, new()
        {
            ["LORAHUB_PLUGIN_PATH"] = temp.Combine("plugins"),
            ["LORAHUB_SCRIPT_CACHE"] = temp.Combine("cache"),
        });

        Assert.True(run.Code == 0, run.Output);
        var lines = run.Output.ReplaceLineEndings("\n").Split('\n');
        // fc1.bias (16) + fc2.bias (1) of 4*16+16+16+1 = 97 parameters.
        Assert.Contains("trainable params: 17 || all params: 97 || trainable%: 17.5258", lines);
        var first = float.Parse(lines.Single(l => l.StartsWith("loss 0 ")).Split(' ')[2]);
        var last = float.Parse(lines.Single(l => l.StartsWith("loss 29 ")).Split(' ')[2]);
        Assert.True(last < first * 0.5, $"loss {first} -> {last}");
        Assert.Contains("weights unchanged: True", lines);
        Assert.Contains("saved: adapter_config.json,adapter_model.safetensors", lines);
    }
}
