using LoRAHub.Host.Commands;
using LoRAHub.Host.Plugins;
using LoRAHub.Models;
using LoRAHub.TorchExtensions;
using TorchSharp;

namespace LoRAHub.Host.Tests;

/// <summary>
/// The embedded base model (examples/base-model), the LoRA and DoRA plugins as the solution build left them, two LoRA
/// adapters and a DoRA one made once for the everyday-command and serve tests: attached with different seeds and their B
/// matrices (and DoRA's magnitudes) filled with noise, so each changes the model's greedy answers (a fresh LoRA, B = 0,
/// would change nothing). Made in a second.
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
        DoRAPlugin = Path.Combine(repo, "plugins", "DoRA", "bin", configuration, "net10.0");
        Assert.True(File.Exists(Path.Combine(DoRAPlugin, "DoRA.dll")), $"{DoRAPlugin} has no DoRA.dll: build the solution in {configuration} first");
        Methods = new PluginLoader().Load([LoRAPlugin, DoRAPlugin]);
        AdapterA = MakeAdapter("a", seed: 1);
        AdapterB = MakeAdapter("b", seed: 2);
        AdapterDora = MakeAdapter("dora", seed: 3, method: "dora");
    }

    public TempFolder Temp { get; } = new();
    public string BaseModel { get; }
    public string LoRAPlugin { get; }
    public string DoRAPlugin { get; }
    public MethodRegistry Methods { get; }
    public string AdapterA { get; }
    public string AdapterB { get; }
    /// <summary>A DoRA adapter (use_dora): its rows must run DoRA's forward whichever adapter loaded first.</summary>
    public string AdapterDora { get; }

    private string MakeAdapter(string name, int seed, string method = "lora")
    {
        using var model = PretrainedModel.LoadLlama(BaseModel);
        torchx.manual_seed(seed);
        using var lora = Methods.Get(method).Attach(model, new { r = 4, lora_alpha = 8, target_modules = "all-linear" });
        using (torch.no_grad())
            foreach (var (key, p) in model.named_parameters())
                if (key.Contains("lora_B")) p.copy_(torch.randn(p.shape) * 0.6);
                else if (key.Contains("lora_magnitude_vector")) p.mul_(torch.rand(p.shape) + 0.5);
        var folder = Temp.Combine("adapters", name);
        lora.Save(folder);
        return folder;
    }

    /// <summary>Runs the CLI in this process with the test host's folder (scaffold/ is there) and the LoRA and DoRA plugins.</summary>
    public async Task<(int Code, string Output, string Error)> Cli(params string[] args)
    {
        var output = new StringWriter();
        var error = new StringWriter();
        var code = await new LoRAHubCli(output, error, AppContext.BaseDirectory).InvokeAsync(["--plugins", $"{LoRAPlugin}{Path.PathSeparator}{DoRAPlugin}", .. args]);
        return (code, output.ToString(), error.ToString());
    }

    public void Dispose() => Temp.Dispose();
}

[CollectionDefinition(Name)]
public sealed class EmbeddedModelCollection : ICollectionFixture<EmbeddedModelFixture>
{
    public const string Name = "embedded model";
}
