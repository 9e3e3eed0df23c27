using System.Text.RegularExpressions;
using LoRAHub.Abstractions;

namespace LoRAHub.Tuners.Lora;

/// <summary>
/// LoRA options, named as PEFT's LoraConfig (bind r, lora_alpha, target_modules, ... from scripts or JSON). The
/// <see cref="ConfigKeyAttribute"/> properties are what adapter_config.json holds, written and read from that one list.
/// Variants of LoRA (DoRA) and methods built on it (QLoRA, LongLoRA) derive from it and add their own options.
/// </summary>
public class LoraOptions : TargetOptions
{
    /// <summary>Rank of A (r×in) and B (out×r).</summary>
    [ConfigKey("r")] public int R { get; set; } = 8;

    /// <summary>Scale numerator: s = lora_alpha / r (or / √r with use_rslora).</summary>
    [ConfigKey("lora_alpha")] public double LoraAlpha { get; set; } = 8;

    /// <summary>Dropout on the adapter path's input only.</summary>
    [ConfigKey("lora_dropout")] public double LoraDropout { get; set; }

    /// <summary>"none", "all" (every bias trains) or "lora_only" (biases of adapted layers train).</summary>
    [ConfigKey("bias")] public string Bias { get; set; } = "none";

    /// <summary>Rank-stabilised scaling α/√r.</summary>
    [ConfigKey("use_rslora")] public bool UseRslora { get; set; }

    [ConfigKey("init_lora_weights")] public LoraInit InitLoraWeights { get; set; } = LoraInit.Default;

    /// <summary>PEFT's loftq_config for init_lora_weights "loftq": {"loftq_bits": 4, "loftq_iter": N}; empty otherwise.</summary>
    [ConfigKey("loftq_config")] public Dictionary<string, int> LoftqConfig { get; set; } = new();

    /// <summary>loftq_config's loftq_iter (PEFT's default 1).</summary>
    public int LoftqIter => LoftqConfig.GetValueOrDefault("loftq_iter", 1);

    /// <summary>PEFT's lora_bias: lora_B gets a trainable bias (zero at init), merged into the base layer's bias.</summary>
    [ConfigKey("lora_bias")] public bool LoraBias { get; set; }

    /// <summary>Per-module rank: key is a regex matched against the end of the module path ("(.*\.)?key$").</summary>
    [ConfigKey("rank_pattern")] public Dictionary<string, int> RankPattern { get; set; } = new();

    /// <summary>Per-module alpha, keys as in rank_pattern.</summary>
    [ConfigKey("alpha_pattern")] public Dictionary<string, double> AlphaPattern { get; set; } = new();

    /// <summary>Modules that get a trainable copy saved with the adapter (e.g. "lm_head", "embed_tokens").</summary>
    [ConfigKey("modules_to_save")] public List<string>? ModulesToSave { get; set; }

    /// <summary>
    /// PEFT's trainable_token_indices: only these rows of the input embedding train (a list), or of each named embedding
    /// (a dict "embed_tokens" → list); on a tied model the output head follows the same rows. Saved as the rows' values.
    /// </summary>
    [ConfigKey("trainable_token_indices")] public TrainableTokenIndices? TrainableTokenIndices { get; set; }

    /// <summary>Recorded as PEFT does: true when the targets are GPT-2's Conv1D (in×out weights), false for Linear; set when the adapter is placed.</summary>
    [ConfigKey("fan_in_fan_out")] public bool FanInFanOut { get; set; }

    /// <summary>Recorded in adapter_config.json.</summary>
    [ConfigKey("task_type")] public string TaskType { get; set; } = "CAUSAL_LM";

    /// <summary>LoRA+: lr of B = lr × ratio (16 is the paper's default). Null: off. A training setting, not saved.</summary>
    public double? LoraplusLrRatio { get; set; }

    /// <summary>LoRA+ learning rate of trainable embedding parameters (PEFT's default). Not saved.</summary>
    public double LoraplusLrEmbedding { get; set; } = 1e-6;

    /// <summary>The variant these options select (PEFT's resolve_lora_variant), or null for plain LoRA.</summary>
    public virtual ILoraVariant? ResolveLoraVariant() => null;

    internal static readonly string[] BiasValues = ["none", "all", "lora_only"];

    /// <summary>Throws AdapterConfigurationException naming the first bad option.</summary>
    public virtual void Validate()
    {
        if (R <= 0) throw Bad("r", $"must be a positive integer, got {R}");
        if (LoraDropout is < 0 or >= 1 || double.IsNaN(LoraDropout)) throw Bad("lora_dropout", $"must be in [0, 1), got {LoraDropout}");
        if (!double.IsFinite(LoraAlpha)) throw Bad("lora_alpha", $"must be finite, got {LoraAlpha}");
        if (!BiasValues.Contains(Bias)) throw Bad("bias", $"must be one of {string.Join(", ", BiasValues.Select(b => $"\"{b}\""))}, got \"{Bias}\"");
        if (LoraplusLrRatio is { } ratio && !(ratio > 0)) throw Bad("loraplus_lr_ratio", $"must be positive (16 is usual) or null, got {ratio}");
        if (!(LoraplusLrEmbedding >= 0)) throw Bad("loraplus_lr_embedding", $"must be non-negative, got {LoraplusLrEmbedding}");
        ValidateTargets("LoRA");
        if (LoraBias && ResolveLoraVariant() is { } variant)
            throw Bad("lora_bias", $"cannot be combined with {variant.ConfigFlag}: the variant computes its own update from B's weight");
        foreach (var (key, rank) in RankPattern)
        {
            CheckPattern("rank_pattern", key);
            if (rank <= 0) throw Bad("rank_pattern", $"rank for '{key}' must be positive, got {rank}");
        }
        foreach (var (key, alpha) in AlphaPattern)
        {
            CheckPattern("alpha_pattern", key);
            if (!double.IsFinite(alpha)) throw Bad("alpha_pattern", $"alpha for '{key}' must be finite, got {alpha}");
        }
        foreach (var m in ModulesToSave ?? [])
            if (string.IsNullOrWhiteSpace(m)) throw Bad("modules_to_save", "contains an empty name");
        if (InitLoraWeights.IsLoftQ)
        {
            // PEFT: "`loftq_config` must be specified when `init_lora_weights` is 'loftq'".
            if (LoftqConfig.Count == 0)
                throw Bad("loftq_config", "must be set when init_lora_weights is \"loftq\", e.g. {\"loftq_bits\": 4, \"loftq_iter\": 1}");
            if (LoftqConfig.Keys.FirstOrDefault(k => k is not ("loftq_bits" or "loftq_iter")) is { } unknown)
                throw Bad("loftq_config", $"has an unknown key '{unknown}'; keys: loftq_bits, loftq_iter");
            if (LoftqConfig.GetValueOrDefault("loftq_bits", 4) != 4)
                throw Bad("loftq_config", $"loftq_bits is {LoftqConfig["loftq_bits"]}: only 4-bit (NF4) LoftQ is supported (PEFT's 8-bit form is not)");
            if (LoftqIter < 1) throw Bad("loftq_config", $"loftq_iter must be at least 1, got {LoftqIter}");
            // A variant initialises its state from the base before LoftQ would replace that base.
            if (ResolveLoraVariant() is { } loftqVariant)
                throw Bad("init_lora_weights", $"\"loftq\" cannot be combined with {loftqVariant.ConfigFlag} here; use LoftQ with plain LoRA or QLoRA");
        }
        else if (LoftqConfig.Count > 0)
            throw Bad("loftq_config", $"is set but init_lora_weights is {InitLoraWeights}; set init_lora_weights to \"loftq\" or clear loftq_config");
        foreach (var (module, indices) in TrainableTokenIndices?.Entries ?? [])
        {
            var where = module is null ? "" : $" for '{module}'";
            if (module is not null && string.IsNullOrWhiteSpace(module)) throw Bad("trainable_token_indices", "has an empty module name");
            if (indices.Count == 0) throw Bad("trainable_token_indices", $"lists no token{where}");
            if (indices.Any(i => i < 0)) throw Bad("trainable_token_indices", $"has a negative token id{where}: {indices.First(i => i < 0)}");
            if (indices.Distinct().Count() != indices.Count) throw Bad("trainable_token_indices", $"repeats a token id{where}");
            if (module is not null && ModulesToSave?.Contains(module) == true)
                throw Bad("trainable_token_indices", $"'{module}' is in modules_to_save too, which trains it whole; name it in one of the two, not both");
        }
    }

    /// <summary>Rank for a module path: rank_pattern's first matching key (PEFT's get_pattern_key), else r.</summary>
    public int RankFor(string path) => PatternValue(RankPattern, path, R);

    public double AlphaFor(string path) => PatternValue(AlphaPattern, path, LoraAlpha);

    private static T PatternValue<T>(Dictionary<string, T> patterns, string path, T fallback)
    {
        foreach (var (key, value) in patterns)
            if (Regex.IsMatch(path, $"^(.*\\.)?({key})$", RegexOptions.CultureInvariant)) return value;
        return fallback;
    }

    private static void CheckPattern(string option, string key)
    {
        try
        {
            _ = new Regex(key);
        }
        catch (ArgumentException e)
        {
            throw Bad(option, $"key '{key}' is not a valid regex ({e.Message})");
        }
    }

    internal static AdapterConfigurationException Bad(string option, string problem) => TargetResolver.Bad("LoRA", option, problem);

    /// <summary>The target selection, with modules_to_save never adapted (PEFT's rule).</summary>
    public override TargetSelection Selection(TargetModuleSpec targets) => base.Selection(targets) with { ModulesToSave = ModulesToSave };

    /// <summary>Takes every LoRA setting of <paramref name="other"/> (for options classes that extend LoRA's).</summary>
    public void CopyLoraSettingsFrom(LoraOptions other) => ConfigFields.Copy(other, this, typeof(LoraOptions));

    /// <summary>A copy of these options (of the same class), sharing no collection with them.</summary>
    public LoraOptions Clone()
    {
        var copy = (LoraOptions)MemberwiseClone();
        ConfigFields.Copy(this, copy, GetType());
        return copy;
    }
}
