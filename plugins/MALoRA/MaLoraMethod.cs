using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;

namespace LoRAHub.Plugins.MALoRA;

/// <summary>The "malora" method: a mixture of asymmetric LoRA experts (Wang et al. 2024) on Linear layers.</summary>
public sealed class MaLoraMethod : AdapterMethod<MaLoraOptions>
{
    public override string Name => "malora";

    public override string Description => "MALoRA: token-routed LoRA experts sharing one down-projection subspace, each with its own up-projection";

    public override IAdapter Attach(IAdaptableModel model, MaLoraOptions options)
    {
        options.Validate();
        return new MaLoraAdapter(this, model, options);
    }

    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var configPath = Path.Combine(directory, MaLoraAdapter.ConfigFile);
        if (!File.Exists(configPath)) throw new FileNotFoundException($"{directory} is not a MALoRA adapter: {MaLoraAdapter.ConfigFile} is missing", configPath);
        MaLoraOptions options;
        try
        {
            options = JsonSerializer.Deserialize<MaLoraOptions>(File.ReadAllText(configPath), MaLoraAdapter.Json) ?? throw new InvalidDataException("the file holds null");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{configPath} is not valid MALoRA config JSON: {e.Message}", e);
        }
        options.Validate();
        var adapter = new MaLoraAdapter(this, model, options);
        try
        {
            torchx.load_safetensors_into(adapter.StateDict(), Path.Combine(directory, MaLoraAdapter.WeightsFile));
        }
        catch
        {
            adapter.Dispose();
            throw;
        }
        return adapter;
    }
}
