using System.Diagnostics;
using LoRAHub.Host.Commands;

namespace LoRAHub.Host.Tests;

/// <summary>End to end: build samples/BitFit, drop it on LORAHUB_PLUGIN_PATH and train through `loraHub run`.</summary>
public sealed class BitFitSampleTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    private const string TrainScript = """
        // A 2-layer MLP written with plain TorchSharp modules, that BitFit can adapt: only its biases will train.
        sealed class Mlp : nn.Module<Tensor, Tensor>, IAdaptableModel
        {
            private readonly nn.Module<Tensor, Tensor> fc1 = nn.Linear(4, 16);
            private readonly nn.Module<Tensor, Tensor> fc2 = nn.Linear(16, 1);
            public Mlp() : base("Mlp") => RegisterComponents();
            public override Tensor forward(Tensor x)
            {
                using var h = fc1.call(x);
                using var a = h.relu();
                return fc2.call(a);
            }
            public nn.Module Root => this;
            public Device Device => CPU;
            public ScalarType DType => ScalarType.Float32;
            public string ModelType => "mlp";
            public string NameOrPath => "test-mlp";
            public IReadOnlyList<string> OutputModuleNames => ["fc2"];
            public AttentionFunction Attention { get; set; } = (q, k, v, m) => throw new NotSupportedException();
        }

        torchx.manual_seed(0);
        var model = new Mlp();
        var x = torch.randn([32, 4]);
        var y = torch.randn([32, 1]) + 3.0;   // an offset the biases can learn
        var method = Method(MethodName ?? "bitfit");
        // Top-level `using var` is not allowed in scripts, so the adapter and optimizer are disposed at the end.
        var adapter = method.Attach(model, new { TrainBiases = true });
        Output(adapter.TrainableParametersReport());
        var optimizer = new AdamW(adapter.ParameterGroups(0.05, 0.0));
        var weightBefore = model.state_dict()["fc1.weight"].clone();
        for (var step = 0; step < 30; step++)
        {
            using var prediction = model.call(x);
            using var loss = torch.nn.functional.mse_loss(prediction, y);
            loss.backward();
            optimizer.step();
            optimizer.zero_grad();
            if (step == 0 || step == 29) Output($"loss {step} {loss.ToSingle()}");
        }
        Output($"weights unchanged: {torch.equal(weightBefore, model.state_dict()["fc1.weight"]).all().item<bool>()}");
        adapter.Save(Path.Combine(ScriptDirectory, "saved"));
        optimizer.Dispose();
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
