using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;

namespace LoRAHub.Samples.BitFit;

/// <summary>BitFit (Ben Zaken et al., 2021): fine-tune only the bias terms (and optionally the norm weights).</summary>
public sealed class BitFitMethod : AdapterMethod<BitFitOptions>
{
    public const string ConfigFile = "adapter_config.json";
    public const string WeightsFile = "adapter_model.safetensors";

    public override string Name => "bitfit";
    public override string Description => "BitFit: trains only bias terms (optionally LayerNorm/RMSNorm weights)";

    public override IAdapter Attach(IAdaptableModel model, BitFitOptions options) => new BitFitAdapter(this, model, options);

    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var configPath = Path.Combine(directory, ConfigFile);
        if (!File.Exists(configPath)) throw new FileNotFoundException($"no {ConfigFile} in {directory}", configPath);
        var config = JsonSerializer.Deserialize<BitFitConfig>(File.ReadAllText(configPath))
                     ?? throw new AdapterConfigurationException($"{configPath} is empty");
        var adapter = new BitFitAdapter(this, model, new BitFitOptions { TrainBiases = config.TrainBiases, TrainNorms = config.TrainNorms });
        var saved = torchx.load_safetensors(Path.Combine(directory, WeightsFile), model.Device);
        try
        {
            adapter.LoadTrained(saved);
        }
        finally
        {
            foreach (var t in saved.Values) t.Dispose();
        }
        return adapter;
    }
}
