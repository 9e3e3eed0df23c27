using LoRAHub.Tuners.Importance;
using System.Text.RegularExpressions;
using LoRAHub.Abstractions;
using LoRAHub.Tuners;

namespace LoRAHub.Plugins.HeadLoRA;

/// <summary>
/// Options of multi-head-aware LoRA ("headlora"): on attention projections every head has its own low-rank adapter and
/// its own rank (q/k/v: the rows of head h get B_h·A_h; o: the columns of head h), other targeted Linears are plain
/// LoRA. In adaptive mode a total budget of rank-1 components moves between heads and matrices by AdaLoRA's importance.
/// The <see cref="ConfigKeyAttribute"/> properties are what headlora_config.json holds.
/// </summary>
public sealed class HeadLoraOptions : TargetOptions
{
    public const string ConfigFileName = "headlora_config.json";

    /// <summary>target_modules when none is given: the attention projections.</summary>
    public static readonly string[] DefaultTargets = ["q_proj", "k_proj", "v_proj", "o_proj"];

    /// <summary>Rank of each head's adapter (and of a plain-LoRA layer) unless head_ranks says otherwise.</summary>
    [ConfigKey("r")] public int R { get; set; } = 4;

    /// <summary>
    /// Per-head ranks by module: key as PEFT's rank_pattern (a name or regex matched at the end of the module path, e.g.
    /// "q_proj" or "layers\.0\.self_attn\.o_proj"), value one rank per head (k/v: per kv head), or one rank for a plain
    /// layer. A saved adapter stores every layer's final ranks here by full path.
    /// </summary>
    [ConfigKey("head_ranks")] public Dictionary<string, List<int>> HeadRanks { get; set; } = new();

    /// <summary>Scale numerator: head h's update is multiplied by lora_alpha / r_h (√r_h with use_rslora).</summary>
    [ConfigKey("lora_alpha")] public double LoraAlpha { get; set; } = 8;

    [ConfigKey("lora_dropout")] public double LoraDropout { get; set; }

    [ConfigKey("use_rslora")] public bool UseRslora { get; set; }

    /// <summary>Width of one head; null: the model's config (head_dim, or hidden_size / num_attention_heads).</summary>
    [ConfigKey("head_dim")] public int? HeadDim { get; set; }

    /// <summary>
    /// Projections whose OUTPUT rows are split by head (q, k, v: heads of k/v are the kv heads; a fused qkv_proj has
    /// heads + 2·kv_heads blocks of head_dim rows).
    /// </summary>
    [ConfigKey("head_output_modules")] public List<string> HeadOutputModules { get; set; } = ["q_proj", "k_proj", "v_proj", "qkv_proj"];

    /// <summary>Projections whose INPUT columns are split by head (o).</summary>
    [ConfigKey("head_input_modules")] public List<string> HeadInputModules { get; set; } = ["o_proj"];

    /// <summary>Adaptive mode: every head (and plain layer) starts at init_r, the budget falls to target_r on average.</summary>
    [ConfigKey("adaptive")] public bool Adaptive { get; set; }

    [ConfigKey("init_r")] public int InitR { get; set; } = 6;

    [ConfigKey("target_r")] public int TargetR { get; set; } = 4;

    [ConfigKey("total_step")] public int? TotalStep { get; set; }

    [ConfigKey("tinit")] public int Tinit { get; set; }

    [ConfigKey("tfinal")] public int Tfinal { get; set; }

    [ConfigKey("deltaT")] public int DeltaT { get; set; } = 1;

    [ConfigKey("beta1")] public double Beta1 { get; set; } = 0.85;

    [ConfigKey("beta2")] public double Beta2 { get; set; } = 0.85;

    /// <summary>What <c>Save</c> writes: "headlora" (this method's folder) or "lora" (PEFT's LoRA format, <c>SavePeftLora</c>). Not saved.</summary>
    public string SaveFormat { get; set; } = "headlora";

    public void Validate()
    {
        if (R < 0) throw Bad("r", $"must be non-negative, got {R}");
        foreach (var (key, ranks) in HeadRanks)
        {
            try
            {
                _ = new Regex(key);
            }
            catch (ArgumentException e)
            {
                throw Bad("head_ranks", $"key '{key}' is not a valid regex ({e.Message})");
            }
            if (ranks is null || ranks.Count == 0 || ranks.Any(r => r < 0))
                throw Bad("head_ranks", $"for '{key}' must list one non-negative rank per head, got [{string.Join(", ", ranks ?? [])}]");
        }
        if (!double.IsFinite(LoraAlpha)) throw Bad("lora_alpha", $"must be finite, got {LoraAlpha}");
        if (LoraDropout is < 0 or >= 1 || double.IsNaN(LoraDropout)) throw Bad("lora_dropout", $"must be in [0, 1), got {LoraDropout}");
        if (HeadDim is { } hd && hd <= 0) throw Bad("head_dim", $"must be positive, got {hd}");
        if (HeadOutputModules.Intersect(HeadInputModules).FirstOrDefault() is { } both)
            throw Bad("head_input_modules", $"and head_output_modules both list '{both}'; a projection is split by head on one side only");
        if (SaveFormat is not ("headlora" or "lora")) throw Bad("save_format", $"must be \"headlora\" or \"lora\" (PEFT's LoRA format), got \"{SaveFormat}\"");
        if (Adaptive) BudgetSchedule.Validate("HeadLoRA", TotalStep, InitR, TargetR, Tinit, Tfinal, DeltaT, Beta1, Beta2);
        ValidateTargets("HeadLoRA");
    }

    /// <summary>head_ranks' first key matching the end of <paramref name="path"/> (PEFT's rank_pattern rule), or null.</summary>
    public List<int>? HeadRanksFor(string path)
    {
        foreach (var (key, ranks) in HeadRanks)
            if (Regex.IsMatch(path, $"^(.*\\.)?({key})$", RegexOptions.CultureInvariant)) return ranks;
        return null;
    }

    internal static AdapterConfigurationException Bad(string option, string problem) => TargetResolver.Bad("HeadLoRA", option, problem);
}
