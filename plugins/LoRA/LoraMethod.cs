using LoRAHub.Abstractions;

namespace LoRAHub.Plugins.LoRA;

/// <summary>The "lora" method: low-rank adapters on Linear layers (Hu et al. 2021), PEFT-compatible.</summary>
public sealed class LoraMethod : AdapterMethod<LoraOptions>
{
    public override string Name => "lora";

    public override string Description => "LoRA: trainable low-rank B·A beside frozen Linear layers (PEFT-compatible; rsLoRA, LoRA+)";

    /// <summary>Adds the adapter "default" with the options and makes it active.</summary>
    public override IAdapter Attach(IAdaptableModel model, LoraOptions options)
    {
        var adapter = new LoraAdapter(this, model);
        adapter.AddAdapter(LoraAdapter.DefaultName, options);
        return adapter;
    }

    /// <summary>Loads a PEFT LoRA folder as the active adapter "default".</summary>
    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var adapter = new LoraAdapter(this, model);
        adapter.LoadAdapter(directory, LoraAdapter.DefaultName);
        return adapter;
    }
}
