using System.Text.Json.Serialization;
using LoRAHub.Abstractions;
using LoRAHub.Plugins.LoRA;

namespace LoRAHub.Plugins.LongLoRA;

/// <summary>
/// LongLoRA options (Chen et al. 2024; names and defaults from dvlab-research/LongLoRA's fine-tuning script):
/// LoRA on the attention projections, embeddings and norms trainable, shifted sparse attention while training.
/// </summary>
public sealed class LongLoraOptions
{
    public int R { get; set; } = 8;

    public double LoraAlpha { get; set; } = 16;

    public double LoraDropout { get; set; }

    public bool UseRslora { get; set; }

    /// <summary>LoRA targets; LongLoRA adapts the attention projections.</summary>
    public TargetModuleSpec TargetModules { get; set; } = new[] { "q_proj", "k_proj", "v_proj", "o_proj" };

    /// <summary>
    /// Modules trained in full beside the adapters (LongLoRA's `trainable_params embed,norm`). They become PEFT
    /// modules_to_save, so the adapter folder loads in Python PEFT and disabling the adapter restores the base exactly.
    /// Null: the model type's embeddings and norms.
    /// </summary>
    public List<string>? TrainableModules { get; set; }

    /// <summary>Each attention group spans this fraction of the sequence (1/4 in the paper); must be 1/n.</summary>
    public double GroupSizeRatio { get; set; } = 0.25;

    /// <summary>False: plain attention during training too (the paper's "LoRA+" with full attention, for comparison).</summary>
    [JsonPropertyName("use_s2attn")]
    public bool UseS2Attn { get; set; } = true;

    /// <summary>Number of groups a sequence splits into (1 / group_size_ratio).</summary>
    [JsonIgnore]
    public int Groups => (int)Math.Round(1 / GroupSizeRatio);

    public void Validate()
    {
        if (!(GroupSizeRatio > 0 && GroupSizeRatio <= 1) || Math.Abs(1 / GroupSizeRatio - Groups) > 1e-6)
            throw new AdapterConfigurationException(
                $"LongLoRA option 'group_size_ratio' must be 1/n for a whole number n (0.25 splits a sequence into 4 groups), got {GroupSizeRatio}");
        if (TrainableModules?.Any(string.IsNullOrWhiteSpace) == true)
            throw new AdapterConfigurationException("LongLoRA option 'trainable_modules' contains an empty name");
    }

    /// <summary>Embeddings and norms by model type, named as transformers names them.</summary>
    public static List<string> DefaultTrainableModules(string modelType) => modelType switch
    {
        "gpt2" => ["wte", "wpe", "ln_1", "ln_2", "ln_f"],
        _ => ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"],
    };

    public LoraOptions ToLoraOptions(string modelType) => new()
    {
        R = R, LoraAlpha = LoraAlpha, LoraDropout = LoraDropout, UseRslora = UseRslora, TargetModules = TargetModules,
        ModulesToSave = (TrainableModules ?? DefaultTrainableModules(modelType)).ToList(),
    };
}
