using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;

namespace LoRAHub.Plugins.DoRA;

/// <summary>
/// DoRA options: every LoRA option (r, lora_alpha, target_modules, lora_dropout, use_rslora, loraplus_lr_ratio,
/// rank_pattern, alpha_pattern, modules_to_save, ...) plus the two below, which only change how training computes
/// and are not written to adapter_config.json (PEFT has no such keys).
/// </summary>
public sealed class DoraOptions : LoraOptions
{
    /// <summary>
    /// Treat ‖W0 + s·B·A‖ as a constant in backward (DoRA paper §4.3, PEFT): m, A and B still train; the norm's own
    /// gradient is dropped, which saves memory and time. False: exact gradients through the norm.
    /// </summary>
    public bool DetachNorm { get; set; } = true;

    public DoraNormMethod NormMethod { get; set; } = DoraNormMethod.Factored;

    public override ILoraVariant ResolveLoraVariant() => new DoraVariant(this);

    public override void Validate()
    {
        base.Validate();
        if (!Enum.IsDefined(NormMethod))
            throw new LoRAHub.Abstractions.AdapterConfigurationException(
                $"DoRA option 'norm_method' must be one of {string.Join(", ", Enum.GetNames<DoraNormMethod>())}, got {(int)NormMethod}");
    }
}
