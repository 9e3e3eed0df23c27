using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.Torch;

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
        var weights = torch.load_safetensors(Path.Combine(directory, MaLoraAdapter.WeightsFile), model.Device);
        try
        {
            using var _ = torch.no_grad();
            foreach (var (key, target) in adapter.StateDict())
            {
                if (!weights.TryGetValue(key, out var t)) throw new InvalidDataException($"{MaLoraAdapter.WeightsFile} in {directory} lacks '{key}'");
                if (!t.shape.SequenceEqual(target.shape))
                    throw new InvalidDataException($"'{key}' has shape [{string.Join(", ", t.shape)}], the layer needs [{string.Join(", ", target.shape)}]");
                target.copy_(t);
            }
        }
        catch
        {
            adapter.Dispose();
            throw;
        }
        finally
        {
            foreach (var t in weights.Values) t.Dispose();
        }
        return adapter;
    }
}
