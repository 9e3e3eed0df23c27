using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;

namespace LoRAHub.Samples.KasaVariant;

/// <summary>
/// KaSA options: every LoRA option (r, lora_alpha, target_modules, lora_dropout, ...) plus PEFT's kasa_config, whose
/// presence in adapter_config.json is what marks a KaSA adapter.
/// </summary>
public sealed class KasaOptions : LoraOptions
{
    [ConfigKey(KasaMethod.ConfigFlag)] public KasaConfig KasaConfig { get; set; } = new();

    public override ILoraVariant ResolveLoraVariant() => new KasaLinearVariant();

    public override void Validate()
    {
        base.Validate();
        if (KasaConfig is null) throw new AdapterConfigurationException("KaSA option 'kasa_config' must be set (e.g. { beta = 1e-4, gamma = 1e-3 })");
        if (!(KasaConfig.Beta >= 0)) throw new AdapterConfigurationException($"KaSA option 'kasa_config.beta' must be non-negative, got {KasaConfig.Beta}");
        if (!(KasaConfig.Gamma >= 0)) throw new AdapterConfigurationException($"KaSA option 'kasa_config.gamma' must be non-negative, got {KasaConfig.Gamma}");
    }
}
