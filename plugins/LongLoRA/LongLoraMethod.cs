using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.Plugins.LoRA;

namespace LoRAHub.Plugins.LongLoRA;

/// <summary>The "longlora" method: efficient long-context fine-tuning (Chen et al. 2024).</summary>
public sealed class LongLoraMethod : AdapterMethod<LongLoraOptions>
{
    public override string Name => "longlora";

    public override string Description => "LongLoRA: LoRA on attention + trainable embeddings/norms, shifted sparse attention while training";

    public override IAdapter Attach(IAdaptableModel model, LongLoraOptions options)
    {
        options.Validate();
        var lora = (LoraAdapter)new LoraMethod().Attach(model, options.ToLoraOptions(model.ModelType));
        return new LongLoraAdapter(this, model, lora, options);
    }

    /// <summary>Loads a folder written by <see cref="LongLoraAdapter.Save"/>: a PEFT LoRA adapter plus longlora_config.json.</summary>
    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var configPath = Path.Combine(directory, LongLoraAdapter.ConfigFile);
        if (!File.Exists(configPath))
            throw new FileNotFoundException($"{directory} is not a LongLoRA adapter: {LongLoraAdapter.ConfigFile} is missing " +
                "(a plain PEFT LoRA folder loads with the \"lora\" method)", configPath);
        LongLoraConfigFile config;
        try
        {
            config = JsonSerializer.Deserialize<LongLoraConfigFile>(File.ReadAllText(configPath), LongLoraAdapter.Json)
                ?? throw new InvalidDataException("the file holds null");
        }
        catch (Exception e) when (e is JsonException or InvalidDataException)
        {
            throw new InvalidDataException($"{configPath} is not valid LongLoRA config JSON: {e.Message}", e);
        }
        var options = new LongLoraOptions { GroupSizeRatio = config.GroupSizeRatio, UseS2Attn = config.UseS2Attn };
        options.Validate();
        var lora = (LoraAdapter)new LoraMethod().Load(model, directory);
        options.CopyLoraSettingsFrom(lora.OptionsOf(LoraAdapter.DefaultName));
        return new LongLoraAdapter(this, model, lora, options);
    }
}
