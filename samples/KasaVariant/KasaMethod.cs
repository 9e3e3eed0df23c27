using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;

namespace LoRAHub.Samples.KasaVariant;

/// <summary>
/// The "kasa" method: KaSA as a LoRA variant (<see cref="KasaLinearVariant"/>) on the tuner kit's <see cref="LoraAdapter"/>,
/// so merge, merge_and_unload, PEFT-format save/load and every LoRA option work as for LoRA. Saved folders are PEFT's
/// (peft_type LORA with kasa_config set) and load in PEFT's LoraConfig/PeftModel.
/// </summary>
public sealed class KasaMethod : AdapterMethod<KasaOptions>
{
    /// <summary>The adapter_config.json key that marks a KaSA adapter (PEFT's LoraConfig.kasa_config).</summary>
    public const string ConfigFlag = "kasa_config";

    private static readonly ILoraVariant[] Variants = [new KasaLinearVariant()];

    public override string Name => "kasa";

    public override string Description => "KaSA: LoRA with a learnable singular-value diagonal, ΔW = s·B·diag(ΔΣ)·A, on an SVD-truncated base (PEFT kasa_config)";

    /// <summary>Adds the KaSA adapter "default"; every target is checked before any base weight is truncated.</summary>
    public override IAdapter Attach(IAdaptableModel model, KasaOptions options)
    {
        var plan = AdapterPlan.Create(model, options.Clone());
        foreach (var (path, r, _) in plan.Layers)
        {
            var linear = LinearLayer.From(model.Root.get_submodule(path)!)!;
            KasaLinearVariant.CheckRank(linear.in_features, linear.out_features, r);
        }
        return LoraAdapter.Build(this, model, adapter => adapter.AddAdapter(LoraAdapter.DefaultName, options), Variants);
    }

    /// <summary>Loads a PEFT folder whose adapter_config.json sets kasa_config, as the active adapter "default".</summary>
    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var config = Path.Combine(directory, AdapterFolder.PeftConfigFile);
        if (!File.Exists(config)) throw new FileNotFoundException($"no {AdapterFolder.PeftConfigFile} in {directory}; is this a PEFT adapter folder?", config);
        if (!AdapterFolder.Sets(directory, ConfigFlag))
            throw new AdapterConfigurationException($"{config}: kasa_config is not set, so this is not a KaSA adapter; load it with the \"lora\" method");
        return LoraAdapter.Build(this, model, adapter => adapter.LoadAdapter(directory, LoraAdapter.DefaultName), Variants);
    }

    /// <summary>A PEFT LoRA folder that sets kasa_config and no other variant key or method config file.</summary>
    public override bool Claims(string directory) => AdapterFolder.IsLoraFolder(directory, ConfigFlag);
}
