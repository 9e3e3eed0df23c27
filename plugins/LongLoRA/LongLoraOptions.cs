using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;

namespace LoRAHub.Plugins.LongLoRA;

/// <summary>
/// LongLoRA options (Chen et al. 2024; defaults from dvlab-research/LongLoRA's fine-tuning script): every LoRA option,
/// with LoRA on the attention projections (r 8, α 16), the embeddings and norms trained in full, and shifted sparse
/// attention while training. The <see cref="ConfigKeyAttribute"/> fields declared here are what longlora_config.json
/// holds beside PEFT's adapter_config.json (which holds the LoRA settings).
/// </summary>
public sealed class LongLoraOptions : LoraOptions
{
    public LongLoraOptions()
    {
        R = 8;
        LoraAlpha = 16;
        TargetModules = new[] { "q_proj", "k_proj", "v_proj", "o_proj" };
    }

    /// <summary>Each attention group spans this fraction of the sequence (1/4 in the paper); must be 1/n.</summary>
    [ConfigKey("group_size_ratio")] public double GroupSizeRatio { get; set; } = 0.25;

    /// <summary>False: plain attention during training too (the paper's "LoRA+" with full attention, for comparison).</summary>
    [ConfigKey("use_s2attn")] public bool UseS2Attn { get; set; } = true;

    /// <summary>Number of groups a sequence splits into (1 / group_size_ratio).</summary>
    public int Groups => (int)Math.Round(1 / GroupSizeRatio);

    public override void Validate()
    {
        if (!(GroupSizeRatio > 0 && GroupSizeRatio <= 1) || Math.Abs(1 / GroupSizeRatio - Groups) > 1e-6)
            throw new AdapterConfigurationException(
                $"LongLoRA option 'group_size_ratio' must be 1/n for a whole number n (0.25 splits a sequence into 4 groups), got {GroupSizeRatio}");
        base.Validate();
    }

    /// <summary>
    /// LongLoRA's `trainable_params embed,norm` for the model type, named as transformers names the modules. They become
    /// PEFT modules_to_save (used when modules_to_save is not set), so the adapter folder loads in Python PEFT and
    /// disabling the adapter restores the base exactly.
    /// </summary>
    public static List<string> EmbeddingsAndNorms(string modelType) => modelType switch
    {
        "gpt2" => ["wte", "wpe", "ln_1", "ln_2", "ln_f"],
        _ => ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"],
    };

    public const string ConfigFileName = "longlora_config.json";

    internal void Save(string directory) => ConfigFile.Write(Path.Combine(directory, ConfigFileName), this, ConfigFields.DeclaredOn(typeof(LongLoraOptions)));

    /// <summary>LongLoRA's own settings of a saved folder (its longlora_config.json).</summary>
    internal static LongLoraOptions ReadSaved(string directory)
    {
        var path = Path.Combine(directory, ConfigFileName);
        if (!File.Exists(path))
            throw new FileNotFoundException($"{directory} is not a LongLoRA adapter: {ConfigFileName} is missing " +
                "(a plain PEFT LoRA folder loads with the \"lora\" method)", path);
        using var doc = ConfigFile.Read(path);
        var options = new LongLoraOptions();
        ConfigFields.ReadFrom(doc.RootElement, options, ConfigFields.DeclaredOn(typeof(LongLoraOptions)), path);
        return options;
    }

    /// <summary>The LoRA part, with the embeddings and norms as modules_to_save unless set.</summary>
    public LoraOptions ToLoraOptions(string modelType)
    {
        var lora = new LoraOptions();
        lora.CopyLoraSettingsFrom(this);
        lora.ModulesToSave ??= EmbeddingsAndNorms(modelType);
        return lora;
    }
}
