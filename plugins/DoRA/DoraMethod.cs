using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;

namespace LoRAHub.Plugins.DoRA;

/// <summary>
/// The "dora" method: weight-decomposed low-rank adaptation (Liu et al. 2024), PEFT-compatible (LoraConfig with
/// use_dora=True). DoRA is a LoRA variant (<see cref="DoraVariant"/>): the adapter is the tuner kit's
/// <see cref="LoraAdapter"/> with DoRA layers, so every LoRA feature (multiple adapters, merge, merge_and_unload, LoRA+,
/// rsLoRA, patterns, modules_to_save) works the same way.
/// </summary>
public sealed class DoraMethod : AdapterMethod<DoraOptions>, ILoraMethod
{
    public const string ConfigFlag = "use_dora";

    public override string Name => "dora";

    public override string Description => "DoRA: LoRA direction plus a trained per-row magnitude, W' = m·(W0+sBA)/‖W0+sBA‖ (PEFT use_dora)";

    /// <summary>A LoraAdapter that also loads DoRA folders (LoadAdapter), for adding further adapters by hand.</summary>
    public LoraAdapter CreateAdapter(IAdaptableModel model) => new(this, model, Variants);

    // The variant LoraAdapter reads use_dora folders with (the options of each adapter pick its own DoraVariant).
    private static readonly ILoraVariant[] Variants = [new DoraVariant(new DoraOptions())];

    /// <summary>DoRA's variant, so a LoRA set another method made can load DoRA folders beside its own (the host's mixed batches).</summary>
    public IReadOnlyList<ILoraVariant> LoraVariants => Variants;

    /// <summary>Adds the DoRA adapter "default" with the options and makes it active; on failure the model is left as it was.</summary>
    public override IAdapter Attach(IAdaptableModel model, DoraOptions options) =>
        LoraAdapter.Build(this, model, adapter => adapter.AddAdapter(LoraAdapter.DefaultName, options), Variants);

    /// <summary>Loads a PEFT folder whose adapter_config.json has use_dora: true as the active adapter "default".</summary>
    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var config = Path.Combine(directory, AdapterFolder.PeftConfigFile);
        if (!File.Exists(config)) throw new FileNotFoundException($"no {AdapterFolder.PeftConfigFile} in {directory}; is this a PEFT adapter folder?", config);
        if (!AdapterFolder.Sets(directory, ConfigFlag))
            throw new AdapterConfigurationException($"{config}: use_dora is not true, so this is not a DoRA adapter; load it with the \"lora\" method");
        return LoraAdapter.Build(this, model, adapter => adapter.LoadAdapter(directory, LoraAdapter.DefaultName), Variants);
    }

    /// <summary>A PEFT LoRA folder with use_dora set and no other method's config file.</summary>
    public override bool Claims(string directory) => AdapterFolder.IsLoraFolder(directory, ConfigFlag);
}
