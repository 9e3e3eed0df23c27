using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.TorchExtensions;

namespace LoRAHub.Samples.BitFit;

/// <summary>BitFit (Ben Zaken et al., 2021): fine-tune only the bias terms (and optionally the norm weights).</summary>
public sealed class BitFitMethod : AdapterMethod<BitFitOptions>
{
    /// <summary>adapter_config.json's peft_type for BitFit folders.</summary>
    public const string PeftType = "BITFIT";

    public override string Name => "bitfit";
    public override string Description => "BitFit: trains only bias terms (optionally LayerNorm/RMSNorm weights)";

    public override IAdapter Attach(IAdaptableModel model, BitFitOptions options) => new BitFitAdapter(this, model, options);

    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var options = ConfigFile.Read<BitFitOptions>(Path.Combine(directory, AdapterFolder.PeftConfigFile));
        var adapter = new BitFitAdapter(this, model, options);
        var saved = torchx.load_safetensors(Path.Combine(directory, AdapterWeightsFile.FileName), model.Device);
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

    /// <summary>A folder whose adapter_config.json has peft_type BITFIT.</summary>
    public override bool Claims(string directory) => AdapterFolder.PeftType(directory) == PeftType;
}
