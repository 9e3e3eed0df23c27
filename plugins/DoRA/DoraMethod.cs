using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.Plugins.LoRA;

namespace LoRAHub.Plugins.DoRA;

/// <summary>
/// The "dora" method: weight-decomposed low-rank adaptation (Liu et al. 2024), PEFT-compatible (LoraConfig with
/// use_dora=True). The returned adapter is the LoRA plugin's <see cref="LoraAdapter"/> with DoRA layers, so every
/// LoRA feature (multiple adapters, merge, LoRA+, rsLoRA, patterns, modules_to_save) works the same way.
/// </summary>
public sealed class DoraMethod : AdapterMethod<DoraOptions>
{
    public override string Name => "dora";

    public override string Description => "DoRA: LoRA direction plus a trained per-row magnitude, W' = m·(W0+sBA)/‖W0+sBA‖ (PEFT use_dora)";

    /// <summary>A LoraAdapter that also loads DoRA folders (LoadAdapter), for adding further adapters by hand.</summary>
    public LoraAdapter CreateAdapter(IAdaptableModel model) => new(this, model, [new DoraVariant(new DoraOptions())]);

    /// <summary>Adds the DoRA adapter "default" with the options and makes it active.</summary>
    public override IAdapter Attach(IAdaptableModel model, DoraOptions options)
    {
        var adapter = CreateAdapter(model);
        try
        {
            adapter.AddAdapter(LoraAdapter.DefaultName, options);
        }
        catch
        {
            adapter.Dispose();
            throw;
        }
        return adapter;
    }

    /// <summary>Loads a PEFT folder whose adapter_config.json has use_dora: true as the active adapter "default".</summary>
    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var config = Path.Combine(directory, "adapter_config.json");
        if (!File.Exists(config)) throw new FileNotFoundException($"no adapter_config.json in {directory}; is this a PEFT adapter folder?", config);
        using (var doc = JsonDocument.Parse(File.ReadAllText(config)))
            if (!doc.RootElement.TryGetProperty("use_dora", out var flag) || flag.ValueKind != JsonValueKind.True)
                throw new AdapterConfigurationException($"{config}: use_dora is not true, so this is not a DoRA adapter; load it with the \"lora\" method");
        var adapter = CreateAdapter(model);
        try
        {
            adapter.LoadAdapter(directory, LoraAdapter.DefaultName);
        }
        catch
        {
            adapter.Dispose();
            throw;
        }
        return adapter;
    }
}
