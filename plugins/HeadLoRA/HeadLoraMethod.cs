using LoRAHub.Abstractions;
using LoRAHub.Tuners;

namespace LoRAHub.Plugins.HeadLoRA;

/// <summary>
/// The "headlora" method: multi-head-aware LoRA, the survey's reading of "MaLoRA" (per-head adapters with per-head
/// ranks, optionally spread by importance). Not the "malora" plugin, which is MALoRA, a mixture of asymmetric LoRA experts.
/// </summary>
public sealed class HeadLoraMethod : AdapterMethod<HeadLoraOptions>
{
    public override string Name => "headlora";

    public override string Description => "Multi-head-aware LoRA: one low-rank adapter and rank per attention head (adaptive head budget optional; exports to PEFT LoRA)";

    public override IAdapter Attach(IAdaptableModel model, HeadLoraOptions options)
    {
        options.Validate();
        return new HeadLoraAdapter(this, model, options);
    }

    /// <summary>Loads a folder written by Save (save_format "headlora"); the layers get the saved per-head ranks.</summary>
    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var configPath = Path.Combine(directory, HeadLoraOptions.ConfigFileName);
        if (!File.Exists(configPath))
            throw new FileNotFoundException($"{directory} is not a HeadLoRA adapter: {HeadLoraOptions.ConfigFileName} is missing " +
                "(a folder exported with SavePeftLora / save_format \"lora\" is a PEFT LoRA: load it with the \"lora\" method)", configPath);
        var options = ConfigFile.Read<HeadLoraOptions>(configPath);
        options.Validate();
        return Adapters.Build(new HeadLoraAdapter(this, model, options, loaded: true), a => a.LoadWeights(directory));
    }

    /// <summary>A folder with headlora_config.json.</summary>
    public override bool Claims(string directory) => File.Exists(Path.Combine(directory, HeadLoraOptions.ConfigFileName));
}
