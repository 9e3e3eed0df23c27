using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;

namespace LoRAHub.Plugins.LoRA;

/// <summary>
/// The "lora" method: low-rank adapters on Linear layers (Hu et al. 2021), PEFT-compatible (rsLoRA, LoRA+). The
/// adapter is the tuner kit's <see cref="LoraAdapter"/>.
/// </summary>
public sealed class LoraMethod : AdapterMethod<LoraOptions>, ILoraMethod
{
    public override string Name => "lora";

    public override string Description => "LoRA: trainable low-rank B·A beside frozen Linear layers (PEFT-compatible; rsLoRA, LoRA+)";

    /// <summary>Adds the adapter "default" with the options and makes it active; on failure the model is left as it was.</summary>
    public override IAdapter Attach(IAdaptableModel model, LoraOptions options) =>
        LoraAdapter.Build(this, model, adapter => adapter.AddAdapter(LoraAdapter.DefaultName, options));

    /// <summary>Loads a PEFT LoRA folder as the active adapter "default".</summary>
    public override IAdapter Load(IAdaptableModel model, string directory) =>
        LoraAdapter.Build(this, model, adapter => adapter.LoadAdapter(directory, LoraAdapter.DefaultName));

    /// <summary>A plain PEFT LoRA folder: peft_type LORA, no LoRA variant set, no other method's config file.</summary>
    public override bool Claims(string directory) => AdapterFolder.IsLoraFolder(directory);
}
