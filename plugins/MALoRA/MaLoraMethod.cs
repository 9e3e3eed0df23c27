using LoRAHub.Abstractions;
using LoRAHub.Tuners;

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
        var configPath = Path.Combine(directory, MaLoraOptions.ConfigFileName);
        if (!File.Exists(configPath))
            throw new FileNotFoundException($"{directory} is not a MALoRA adapter: {MaLoraOptions.ConfigFileName} is missing", configPath);
        var options = ConfigFile.Read<MaLoraOptions>(configPath);
        options.Validate();
        return Adapters.Build(new MaLoraAdapter(this, model, options), a => a.LoadWeights(directory));
    }

    /// <summary>A folder with malora_config.json.</summary>
    public override bool Claims(string directory) => File.Exists(Path.Combine(directory, MaLoraOptions.ConfigFileName));
}
