using LoRAHub.Tuners.Importance;
using LoRAHub.Abstractions;
using LoRAHub.Tuners;

namespace LoRAHub.Plugins.AdaLoRA;

/// <summary>
/// AdaLoRA options, named and defaulted as PEFT's AdaLoraConfig (Zhang et al. 2023): every adapted Linear starts with
/// init_r triplets (A row, E value, B column); between tinit and total_step − tfinal the total budget falls from
/// init_r·layers to target_r·layers on a cubic schedule, every deltaT steps the least important triplets are masked.
/// The <see cref="ConfigKeyAttribute"/> properties are what adapter_config.json holds.
/// </summary>
public sealed class AdaLoraOptions : TargetOptions
{
    /// <summary>Average rank per layer at the end of the budget schedule.</summary>
    [ConfigKey("target_r")] public int TargetR { get; set; } = 8;

    /// <summary>Rank every layer starts with.</summary>
    [ConfigKey("init_r")] public int InitR { get; set; } = 12;

    /// <summary>Steps of warm-up before the budget starts to fall.</summary>
    [ConfigKey("tinit")] public int Tinit { get; set; }

    /// <summary>Final steps trained with the budget fixed at target_r.</summary>
    [ConfigKey("tfinal")] public int Tfinal { get; set; }

    /// <summary>Steps between two budget allocations.</summary>
    [ConfigKey("deltaT")] public int DeltaT { get; set; } = 1;

    /// <summary>EMA factor of the sensitivity |w·∂L/∂w|.</summary>
    [ConfigKey("beta1")] public double Beta1 { get; set; } = 0.85;

    /// <summary>EMA factor of the sensitivity's uncertainty.</summary>
    [ConfigKey("beta2")] public double Beta2 { get; set; } = 0.85;

    /// <summary>Weight of the orthogonality regulariser ‖AAᵀ − I‖_F + ‖BᵀB − I‖_F (averaged over matrices).</summary>
    [ConfigKey("orth_reg_weight")] public double OrthRegWeight { get; set; } = 0.5;

    /// <summary>Total training steps; the schedule needs it (PEFT requires it too).</summary>
    [ConfigKey("total_step")] public int? TotalStep { get; set; }

    /// <summary>Scale numerator: the update is B·(A⊙E)·lora_alpha/(rank + 1e-5).</summary>
    [ConfigKey("lora_alpha")] public double LoraAlpha { get; set; } = 8;

    [ConfigKey("lora_dropout")] public double LoraDropout { get; set; }


    /// <summary>Recorded in adapter_config.json.</summary>
    [ConfigKey("task_type")] public string TaskType { get; set; } = "CAUSAL_LM";

    /// <summary>Which triplets survived the last allocation, by "module path.lora_E" (PEFT's rank_pattern); set by training.</summary>
    [ConfigKey("rank_pattern")] public Dictionary<string, bool[]>? RankPattern { get; set; }

    public void Validate()
    {
        BudgetSchedule.Validate("AdaLoRA", TotalStep, InitR, TargetR, Tinit, Tfinal, DeltaT, Beta1, Beta2);
        if (!(OrthRegWeight >= 0)) throw Bad("orth_reg_weight", $"must be non-negative, got {OrthRegWeight}");
        if (LoraDropout is < 0 or >= 1 || double.IsNaN(LoraDropout)) throw Bad("lora_dropout", $"must be in [0, 1), got {LoraDropout}");
        ValidateTargets("AdaLoRA");
    }

    internal static AdapterConfigurationException Bad(string option, string problem) => TargetResolver.Bad("AdaLoRA", option, problem);

}
