using LoRAHub.Abstractions;
using LoRAHub.Torch;

namespace LoRAHub.Plugins.AdaLoRA;

/// <summary>The "adalora" method: adaptive budget allocation for LoRA (Zhang et al. 2023), PEFT-compatible.</summary>
public sealed class AdaLoraMethod : AdapterMethod<AdaLoraOptions>
{
    public override string Name => "adalora";

    public override string Description => "AdaLoRA: SVD-shaped adapters whose rank budget moves to the important layers while training (PEFT-compatible)";

    public override IAdapter Attach(IAdaptableModel model, AdaLoraOptions options)
    {
        options.Validate();
        return new AdaLoraAdapter(this, model, options);
    }

    /// <summary>Loads a PEFT AdaLoRA folder: layers get the ranks its rank_pattern kept, with the scale of training (ranknum = init_r).</summary>
    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var options = AdaLoraFiles.ReadOptions(directory);
        options.TotalStep ??= options.Tinit + options.Tfinal + 1; // not needed for inference; keeps Validate's schedule check meaningful
        options.Validate();
        var ranks = options.RankPattern?.ToDictionary(p => p.Key[..^".lora_E".Length], p => p.Value.Count(k => k));
        var adapter = new AdaLoraAdapter(this, model, options, ranks);
        var weights = torch.load_safetensors(Path.Combine(directory, AdaLoraFiles.WeightsFile), model.Device);
        try
        {
            using var _ = torch.no_grad();
            foreach (var (path, layer) in adapter.Layers)
                foreach (var (name, target) in new[] { ("lora_A", layer.A), ("lora_E", layer.E), ("lora_B", layer.B) })
                {
                    var key = $"base_model.model.{path}.{name}";
                    if (!weights.TryGetValue(key, out var t))
                        throw new InvalidDataException($"{AdaLoraFiles.WeightsFile} in {directory} lacks '{key}'");
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
