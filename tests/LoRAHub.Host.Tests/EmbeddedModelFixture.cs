using LoRAHub.Host.Commands;
using LoRAHub.Host.Plugins;
using LoRAHub.Models;
using LoRAHub.TorchExtensions;
using TorchSharp;

namespace LoRAHub.Host.Tests;

/// <summary>
/// The embedded base model (examples/base-model), the LoRA plugin as the solution build left it, and two LoRA adapters
/// made once for the everyday-command and serve tests: attached with different seeds and their B matrices filled with
/// noise, so each changes the model's greedy answers (a fresh LoRA, B = 0, would change nothing). Made in a second.
/// </summary>
public sealed class EmbeddedModelFixture : IDisposable
{
    public EmbeddedModelFixture()
    {
        TorchRuntime.Initialize();
        var repo = HostProcess.RepoRoot();
        BaseModel = Path.Combine(repo, "examples", "base-model");
        var configuration = AppContext.BaseDirectory.Contains($"{Path.DirectorySeparatorChar}Debug{Path.DirectorySeparatorChar}") ? "Debug" : "Release";
        LoRAPlugin = Path.Combine(repo, "plugins", "LoRA", "bin", configuration, "net10.0");
        Assert.True(File.Exists(Path.Combine(LoRAPlugin, "LoRA.dll")), $"{LoRAPlugin} has no LoRA.dll: build the solution in {configuration} first");
        Methods = new PluginLoader().Load([LoRAPlugin]);
        AdapterA = MakeAdapter("a", seed: 1);
        AdapterB = MakeAdapter("b", seed: 2);
    }

    public TempFolder Temp { get; } = new();
    public string BaseModel { get; }
    public string LoRAPlugin { get; }
    public MethodRegistry Methods { get; }
    public string AdapterA { get; }
    public string AdapterB { get; }

    private string MakeAdapter(string name, int seed)
    {
        using var model = PretrainedModel.LoadLlama(BaseModel);
        torchx.manual_seed(seed);
        using var lora = Methods.Get("lora").Attach(model, new { r = 4, lora_alpha = 8, target_modules = "all-linear" });
        using (torch.no_grad())
            foreach (var (key, p) in model.named_parameters())
                if (key.Contains("lora_B")) p.copy_(torch.randn(p.shape) * 0.6);
        var folder = Temp.Combine("adapters", name);
        lora.Save(folder);
        return folder;
    }

    /// <summary>Runs the CLI in this process with the test host's folder (scaffold/ is there) and the LoRA plugin.</summary>
    public async Task<(int Code, string Output, string Error)> Cli(params string[] args)
    {
        var output = new StringWriter();
        var error = new StringWriter();
        var code = await new LoRAHubCli(output, error, AppContext.BaseDirectory).InvokeAsync(["--plugins", LoRAPlugin, .. args]);
        return (code, output.ToString(), error.ToString());
    }

    public void Dispose() => Temp.Dispose();
}

[CollectionDefinition(Name)]
public sealed class EmbeddedModelCollection : ICollectionFixture<EmbeddedModelFixture>
{
    public const string Name = "embedded model";
}
