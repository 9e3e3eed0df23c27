using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;

namespace LoRAHub.Models.Llama;

/// <summary>Llama-family configuration (Llama 2/3, TinyLlama, Mistral, Qwen2), read from and written to config.json.</summary>
public sealed class LlamaConfig
{
    [JsonPropertyName("model_type")] public string ModelType { get; set; } = "llama";
    [JsonPropertyName("vocab_size")] public int VocabSize { get; set; } = 32000;
    [JsonPropertyName("hidden_size")] public int HiddenSize { get; set; } = 4096;
    [JsonPropertyName("intermediate_size")] public int IntermediateSize { get; set; } = 11008;
    [JsonPropertyName("num_hidden_layers")] public int NumHiddenLayers { get; set; } = 32;
    [JsonPropertyName("num_attention_heads")] public int NumAttentionHeads { get; set; } = 32;
    [JsonPropertyName("num_key_value_heads")] public int? NumKeyValueHeads { get; set; }
    [JsonPropertyName("head_dim")] public int? HeadDimOverride { get; set; }
    [JsonPropertyName("rms_norm_eps")] public double RmsNormEps { get; set; } = 1e-6;
    [JsonPropertyName("rope_theta")] public double RopeTheta { get; set; } = 10000.0;
    [JsonPropertyName("rope_scaling")] public RopeScaling? RopeScaling { get; set; }
    /// <summary>transformers 5 writes rope_theta and the scaling together here; read only, folded into the two above.</summary>
    [JsonPropertyName("rope_parameters")] public RopeScaling? RopeParameters { get; set; }
    [JsonPropertyName("max_position_embeddings")] public int MaxPositionEmbeddings { get; set; } = 2048;
    [JsonPropertyName("tie_word_embeddings")] public bool TieWordEmbeddings { get; set; }
    [JsonPropertyName("attention_bias")] public bool AttentionBias { get; set; }
    [JsonPropertyName("mlp_bias")] public bool MlpBias { get; set; }
    [JsonPropertyName("bos_token_id")] public int? BosTokenId { get; set; } = 1;
    [JsonPropertyName("eos_token_id")] public JsonElement? EosTokenIdRaw { get; set; }
    [JsonPropertyName("pad_token_id")] public int? PadTokenId { get; set; }
    [JsonPropertyName("torch_dtype")] public string? TorchDType { get; set; }

    [JsonIgnore] public int KeyValueHeads => NumKeyValueHeads ?? NumAttentionHeads;
    [JsonIgnore] public int HeadDim => HeadDimOverride ?? HiddenSize / NumAttentionHeads;
    /// <summary>Qwen2 puts biases on q/k/v (not o); Llama uses attention_bias for all four.</summary>
    [JsonIgnore] public bool QkvBias => ModelType == "qwen2" || AttentionBias;
    [JsonIgnore] public bool OutputBias => ModelType != "qwen2" && AttentionBias;

    [JsonIgnore] public int[] EosTokenIds => EosTokenIdRaw switch
    {
        { ValueKind: JsonValueKind.Number } e => [e.GetInt32()],
        { ValueKind: JsonValueKind.Array } e => e.EnumerateArray().Select(x => x.GetInt32()).ToArray(),
        _ => [],
    };

    public static readonly string[] SupportedTypes = ["llama", "mistral", "qwen2"];

    private static readonly JsonSerializerOptions Json = new() { WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull };

    public static LlamaConfig FromJson(string json, string source = "config.json")
    {
        LlamaConfig config;
        try
        {
            config = JsonSerializer.Deserialize<LlamaConfig>(json, Json) ?? throw new JsonException("empty");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{source}: not a valid model config ({e.Message})", e);
        }
        if (config.RopeParameters is { } rp)
        {
            config.RopeTheta = rp.RopeTheta ?? config.RopeTheta;
            if (rp.Kind != "default") config.RopeScaling ??= rp;
            config.RopeParameters = null;
        }
        config.Validate(source);
        return config;
    }

    public void Validate(string source = "config")
    {
        void Require(bool ok, string message)
        {
            if (!ok) throw new InvalidDataException($"{source}: {message}");
        }
        Require(SupportedTypes.Contains(ModelType), $"model_type '{ModelType}' is not a Llama-family type ({string.Join(", ", SupportedTypes)})");
        Require(HiddenSize > 0 && NumHiddenLayers > 0 && NumAttentionHeads > 0 && VocabSize > 0 && IntermediateSize > 0, "sizes must be positive");
        Require(HeadDimOverride.HasValue || HiddenSize % NumAttentionHeads == 0, $"hidden_size {HiddenSize} is not divisible by num_attention_heads {NumAttentionHeads}");
        Require(NumAttentionHeads % KeyValueHeads == 0, $"num_attention_heads {NumAttentionHeads} is not a multiple of num_key_value_heads {KeyValueHeads}");
        Require(HeadDim % 2 == 0, $"head_dim {HeadDim} must be even for rotary embeddings");
    }

    public string ToJson()
    {
        var node = JsonSerializer.SerializeToNode(this, Json)!.AsObject();
        node["architectures"] = new JsonArray(ModelType switch { "qwen2" => "Qwen2ForCausalLM", "mistral" => "MistralForCausalLM", _ => "LlamaForCausalLM" });
        node["hidden_act"] = "silu";
        return node.ToJsonString(Json);
    }
}

/// <summary>rope_scaling: "llama3" (Llama 3.1+) and "linear" are applied; other types are rejected.</summary>
public sealed class RopeScaling
{
    [JsonPropertyName("rope_type")] public string? RopeType { get; set; }
    [JsonPropertyName("type")] public string? LegacyType { get; set; }
    [JsonPropertyName("factor")] public double Factor { get; set; } = 1.0;
    [JsonPropertyName("low_freq_factor")] public double LowFreqFactor { get; set; } = 1.0;
    [JsonPropertyName("high_freq_factor")] public double HighFreqFactor { get; set; } = 4.0;
    [JsonPropertyName("rope_theta")] public double? RopeTheta { get; set; }
    [JsonPropertyName("original_max_position_embeddings")] public int OriginalMaxPositionEmbeddings { get; set; } = 8192;

    public string Kind => RopeType ?? LegacyType ?? "default";
}
