using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;

namespace LoRAHub.Plugins.LongLoRA;

/// <summary>The "longlora" method: efficient long-context fine-tuning (Chen et al. 2024), on the tuner kit's LoRA.</summary>
public sealed class LongLoraMethod : AdapterMethod<LongLoraOptions>, ILoraMethod
{
    public override string Name => "longlora";

    public override string Description => "LongLoRA: LoRA on attention + trainable embeddings/norms, shifted sparse attention while training";

    public override IAdapter Attach(IAdaptableModel model, LongLoraOptions options)
    {
        options.Validate();
        var lora = LoraAdapter.Build(this, model, a => a.AddAdapter(LoraAdapter.DefaultName, options.ToLoraOptions(model.ModelType)));
        return new LongLoraAdapter(this, model, lora, options);
    }

    /// <summary>Loads a folder written by <see cref="LongLoraAdapter.Save"/>: a PEFT LoRA adapter plus longlora_config.json.</summary>
    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var options = LongLoraOptions.ReadSaved(directory);
        options.Validate();
        var lora = LoraAdapter.Build(this, model, a => a.LoadAdapter(directory, LoraAdapter.DefaultName));
        options.CopyLoraSettingsFrom(lora.OptionsOf(LoraAdapter.DefaultName));
        return new LongLoraAdapter(this, model, lora, options);
    }

    /// <summary>A PEFT LoRA folder (no LoRA variant set) with longlora_config.json beside it.</summary>
    public override bool Claims(string directory) => AdapterFolder.IsLoraFolder(directory, methodConfigFile: LongLoraOptions.ConfigFileName);
}
