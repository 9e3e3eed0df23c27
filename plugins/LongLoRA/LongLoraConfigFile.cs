using System.Text.Json.Serialization;

namespace LoRAHub.Plugins.LongLoRA;

/// <summary>longlora_config.json: what LongLoRA adds to PEFT's adapter_config.json (which holds the LoRA settings).</summary>
public sealed record LongLoraConfigFile(
    [property: JsonPropertyName("group_size_ratio")] double GroupSizeRatio,
    [property: JsonPropertyName("use_s2attn")] bool UseS2Attn);
