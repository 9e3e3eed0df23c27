using LoRAHub.Abstractions;
using LoRAHub.Tuners;

namespace LoRAHub.Plugins.MALoRA;

/// <summary>
/// MALoRA options (Wang et al. 2024, "MALoRA: Mixture of Asymmetric Low-Rank Adaptation for Enhanced Multi-Task
/// Learning"): each adapted Linear gets num_experts LoRA experts that share one down-projection subspace S (shared_rank ×
/// in); expert t adds B_t·P_t·S·x with a private P_t (expert_rank × shared_rank) and B_t (out × expert_rank), mixed by
/// a token-level top-k router. The <see cref="ConfigKeyAttribute"/> properties are what malora_config.json holds.
/// </summary>
public sealed class MaLoraOptions : TargetOptions
{
    [ConfigKey("num_experts")] public int NumExperts { get; set; } = 4;

    /// <summary>Experts each token uses (their gates renormalised to sum to 1).</summary>
    [ConfigKey("top_k")] public int TopK { get; set; } = 2;

    /// <summary>Rows of the shared down-projection S.</summary>
    [ConfigKey("shared_rank")] public int SharedRank { get; set; } = 8;

    /// <summary>Rank of each expert's P_t and B_t (the rank saved by sharing S goes here).</summary>
    [ConfigKey("expert_rank")] public int ExpertRank { get; set; } = 8;

    /// <summary>Scale numerator: each expert's output is multiplied by lora_alpha / expert_rank.</summary>
    [ConfigKey("lora_alpha")] public double LoraAlpha { get; set; } = 16;

    [ConfigKey("lora_dropout")] public double LoraDropout { get; set; }

    /// <summary>Weight of the load-balancing loss (Switch Transformer's: experts · Σ_t fraction_t · mean gate probability_t).</summary>
    [ConfigKey("router_aux_loss_coef")] public double RouterAuxLossCoef { get; set; } = 0.01;

    /// <summary>target_modules when none is given: the MLP projections.</summary>
    public static readonly string[] DefaultTargets = ["gate_proj", "up_proj", "down_proj"];

    public double Scaling => LoraAlpha / ExpertRank;

    public void Validate()
    {
        if (NumExperts < 1) throw Bad("num_experts", $"must be at least 1, got {NumExperts}");
        if (TopK < 1 || TopK > NumExperts) throw Bad("top_k", $"must be between 1 and num_experts ({NumExperts}), got {TopK}");
        if (SharedRank < 1) throw Bad("shared_rank", $"must be positive, got {SharedRank}");
        if (ExpertRank < 1) throw Bad("expert_rank", $"must be positive, got {ExpertRank}");
        if (!double.IsFinite(LoraAlpha)) throw Bad("lora_alpha", $"must be finite, got {LoraAlpha}");
        if (LoraDropout is < 0 or >= 1 || double.IsNaN(LoraDropout)) throw Bad("lora_dropout", $"must be in [0, 1), got {LoraDropout}");
        if (!(RouterAuxLossCoef >= 0)) throw Bad("router_aux_loss_coef", $"must be non-negative, got {RouterAuxLossCoef}");
        ValidateTargets("MALoRA");
    }

    internal static AdapterConfigurationException Bad(string option, string problem) => TargetResolver.Bad("MALoRA", option, problem);

    public const string ConfigFileName = "malora_config.json";
}
