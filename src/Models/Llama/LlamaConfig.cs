using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;

namespace LoRAHub.Models.Llama;

/// <summary>
/// Configuration of the decoders built on the Llama structure (Llama 2/3, TinyLlama, Mistral, Qwen2, Qwen3, Gemma 2,
/// Gemma 3 text, Phi-3, Mixtral), read from and written to config.json. What differs between the families beyond these
/// fields is in <see cref="DecoderFamily"/>.
/// </summary>
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

    // Sliding-window attention: which layers use it (layer_types, or the family's rule when absent) and the window W.
    [JsonPropertyName("sliding_window")] public int? SlidingWindow { get; set; }
    [JsonPropertyName("use_sliding_window")] public bool? UseSlidingWindow { get; set; }
    [JsonPropertyName("max_window_layers")] public int? MaxWindowLayers { get; set; }
    [JsonPropertyName("layer_types")] public string[]? LayerTypes { get; set; }
    [JsonPropertyName("sliding_window_pattern")] public int? SlidingWindowPattern { get; set; }

    // Gemma: attention scale 1/√query_pre_attn_scalar, tanh soft-capping of attention and final logits, local rope base.
    [JsonPropertyName("query_pre_attn_scalar")] public double? QueryPreAttnScalar { get; set; }
    [JsonPropertyName("attn_logit_softcapping")] public double? AttnLogitSoftcapping { get; set; }
    [JsonPropertyName("final_logit_softcapping")] public double? FinalLogitSoftcapping { get; set; }
    [JsonPropertyName("rope_local_base_freq")] public double? RopeLocalBaseFreq { get; set; }

    /// <summary>The MLP activation: hidden_act (Llama, Mistral, Qwen, Phi-3, Mixtral) or hidden_activation (Gemma).</summary>
    [JsonPropertyName("hidden_act")] public string? HiddenAct { get; set; }
    [JsonPropertyName("hidden_activation")] public string? HiddenActivation { get; set; }
    /// <summary>Phi-3: the share of each head's dimensions that rotary embeddings rotate (the rest pass unchanged).</summary>
    [JsonPropertyName("partial_rotary_factor")] public double PartialRotaryFactor { get; set; } = 1.0;

    // Mixtral: experts per layer, experts per token, and the router's load-balancing loss.
    [JsonPropertyName("num_local_experts")] public int? NumLocalExperts { get; set; }
    [JsonPropertyName("num_experts_per_tok")] public int NumExpertsPerTok { get; set; } = 2;
    [JsonPropertyName("router_aux_loss_coef")] public double RouterAuxLossCoef { get; set; } = 0.001;
    [JsonPropertyName("output_router_logits")] public bool OutputRouterLogits { get; set; }
    [JsonPropertyName("router_jitter_noise")] public double RouterJitterNoise { get; set; }

    /// <summary>
    /// The rope base of sliding-window layers where it differs from rope_theta (Gemma 3: rope_local_base_freq, or transformers
    /// 5's rope_parameters.sliding_attention; 10000 when config.json has neither); null for the other families.
    /// </summary>
    [JsonIgnore] public double? SlidingRopeTheta
    {
        get => slidingRopeTheta ?? RopeLocalBaseFreq ?? (ModelType == "gemma3_text" ? 10000.0 : null);
        set => slidingRopeTheta = value;
    }

    private double? slidingRopeTheta;

    [JsonIgnore] public int KeyValueHeads => NumKeyValueHeads ?? NumAttentionHeads;
    [JsonIgnore] public int HeadDim => HeadDimOverride ?? HiddenSize / NumAttentionHeads;
    [JsonIgnore] public DecoderFamily Family => DecoderFamily.Of(ModelType);
    /// <summary>Dimensions of each head that rotary embeddings rotate (head_dim · partial_rotary_factor).</summary>
    [JsonIgnore] public int RotaryDim => (int)(HeadDim * PartialRotaryFactor);
    [JsonIgnore] public string Activation => HiddenActivation ?? HiddenAct ?? Family.DefaultActivation;
    /// <summary>Softmax scale of attention scores: 1/√query_pre_attn_scalar for Gemma (256 by default), else 1/√head_dim.</summary>
    [JsonIgnore] public double AttentionScale => 1.0 / Math.Sqrt(QueryPreAttnScalar ?? (Family.GemmaNorm ? 256 : HeadDim));
    [JsonIgnore] public bool IsMixtureOfExperts => Family.MixtureOfExperts;

    /// <summary>
    /// The attention window of layer <paramref name="layer"/>: <see cref="SlidingWindow"/> for a sliding-window layer, null
    /// for full attention. layer_types decides where config.json has it; otherwise the family's rule (all layers for
    /// Mistral, Mixtral, Phi-3; from max_window_layers on with use_sliding_window for Qwen; Gemma 2 every other layer from
    /// the first; Gemma 3 all but every sliding_window_pattern-th).
    /// </summary>
    public int? WindowOf(int layer) => SlidingWindow is int w && IsSlidingLayer(layer) ? w : null;

    /// <summary>Whether layer <paramref name="layer"/> is a sliding-window (local) layer by layer_types or the family's rule.</summary>
    public bool IsSlidingLayer(int layer)
    {
        if (LayerTypes is { } types) return types[layer] == "sliding_attention";
        return ModelType switch
        {
            "mistral" or "mixtral" or "phi3" => true,
            "qwen2" or "qwen3" => UseSlidingWindow == true && layer >= (MaxWindowLayers ?? 0),
            "gemma2" => (layer + 1) % 2 != 0,
            "gemma3_text" => (layer + 1) % (SlidingWindowPattern ?? 6) != 0,
            _ => false,
        };
    }

    /// <summary>Qwen2 puts biases on q/k/v (not o); Llama uses attention_bias for all four.</summary>
    [JsonIgnore] public bool QkvBias => ModelType == "qwen2" || AttentionBias;
    [JsonIgnore] public bool OutputBias => ModelType != "qwen2" && AttentionBias;

    [JsonIgnore] public int[] EosTokenIds => EosTokenIdRaw switch
    {
        { ValueKind: JsonValueKind.Number } e => [e.GetInt32()],
        { ValueKind: JsonValueKind.Array } e => e.EnumerateArray().Select(x => x.GetInt32()).ToArray(),
        _ => [],
    };

    public static IReadOnlyList<string> SupportedTypes => DecoderFamily.ModelTypes;

    private static readonly JsonSerializerOptions Json = new() { WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull };

    public static LlamaConfig FromJson(string json, string source = "config.json")
    {
        LlamaConfig config;
        // One place turns every malformed-JSON failure (syntax, a value of the wrong JSON type, a nested object that is
        // not one) into an error naming the file; Validate then checks the values.
        try
        {
            if (JsonNode.Parse(json) is not JsonObject root)
                throw new InvalidDataException($"{source}: not a model config (the file must hold one JSON object)");
            config = root.Deserialize<LlamaConfig>(Json) ?? throw new JsonException("empty");
            if (config.RopeParameters is { } rp)
            {
                config.RopeTheta = rp.RopeTheta ?? config.RopeTheta;
                if (rp.Kind != "default") config.RopeScaling ??= rp;
                config.RopeParameters = null;
            }
            config.ApplyFamilyDefaults(root);
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException)
        {
            throw new InvalidDataException($"{source}: not a valid model config ({e.Message})", e);
        }
        config.Validate(source);
        return config;
    }

    // Keys transformers leaves out of config.json when they equal the class's default (tie_word_embeddings for Gemma), and
    // transformers 5's rope_parameters keyed by layer type.
    private void ApplyFamilyDefaults(JsonObject json)
    {
        if (!DecoderFamily.ModelTypes.Contains(ModelType)) return;
        var family = Family;
        if (!json.ContainsKey("tie_word_embeddings")) TieWordEmbeddings = family.DefaultTieWordEmbeddings;
        if (json["rope_parameters"] is JsonObject rp)
        {
            if (rp["full_attention"] is JsonObject full)
            {
                if (full["rope_theta"] is JsonValue t) RopeTheta = t.GetValue<double>();
                var kind = full["rope_type"]?.GetValue<string>() ?? "default";
                if (kind != "default") RopeScaling = full.Deserialize<RopeScaling>(Json);
            }
            if (rp["sliding_attention"] is JsonObject sliding && sliding["rope_theta"] is JsonValue st) SlidingRopeTheta = st.GetValue<double>();
            // transformers 5 moved Phi-3's partial_rotary_factor in here.
            if (rp["partial_rotary_factor"] is JsonValue prf && !json.ContainsKey("partial_rotary_factor")) PartialRotaryFactor = prf.GetValue<double>();
        }
        if (json["sliding_window_pattern"] is null && json["_sliding_window_pattern"] is JsonValue p) SlidingWindowPattern = p.GetValue<int>();
    }

    /// <summary>torch_dtype values transformers writes (with or without "torch."); LoRAHub loads any of them in the dtype asked.</summary>
    public static IReadOnlyList<string> TorchDTypes => ["float32", "float16", "bfloat16", "float64", "float", "half", "double", "auto"];

    /// <summary>
    /// Every check of config.json's values, in one place, before anything is built: each failure names the file and the
    /// field with the value found and what is expected.
    /// </summary>
    public void Validate(string source = "config")
    {
        void Require(bool ok, string message)
        {
            if (!ok) throw new InvalidDataException($"{source}: {message}");
        }
        void Positive(string field, double? value)
        {
            if (value is { } v) Require(v > 0 && double.IsFinite(v), $"'{field}' is {v}; it must be a positive number");
        }
        Require(SupportedTypes.Contains(ModelType), $"model_type '{ModelType}' is not supported; supported: {string.Join(", ", SupportedTypes)}");
        Positive("vocab_size", VocabSize);
        Positive("hidden_size", HiddenSize);
        Positive("intermediate_size", IntermediateSize);
        Positive("num_hidden_layers", NumHiddenLayers);
        Positive("num_attention_heads", NumAttentionHeads);
        Positive("num_key_value_heads", NumKeyValueHeads);
        Positive("head_dim", HeadDimOverride);
        Positive("max_position_embeddings", MaxPositionEmbeddings);
        Positive("rope_theta", RopeTheta);
        Positive("rope_local_base_freq", RopeLocalBaseFreq);
        Positive("rope_parameters.sliding_attention.rope_theta", slidingRopeTheta);
        Positive("query_pre_attn_scalar", QueryPreAttnScalar);
        Require(RmsNormEps >= 0 && double.IsFinite(RmsNormEps), $"'rms_norm_eps' is {RmsNormEps}; it must be a small non-negative number (e.g. 1e-6)");
        Require(HeadDimOverride.HasValue || HiddenSize % NumAttentionHeads == 0,
            $"'num_attention_heads' {NumAttentionHeads} does not divide 'hidden_size' {HiddenSize} (or give 'head_dim')");
        Require(NumAttentionHeads % KeyValueHeads == 0, $"'num_attention_heads' {NumAttentionHeads} is not a multiple of 'num_key_value_heads' {KeyValueHeads}");
        Require(HeadDim % 2 == 0, $"'head_dim' {HeadDim} must be even for rotary embeddings");
        Require(PartialRotaryFactor > 0 && PartialRotaryFactor <= 1 && RotaryDim % 2 == 0,
            $"'partial_rotary_factor' {PartialRotaryFactor} must give an even rotary dimension in (0, head_dim {HeadDim}]");
        Require(RopeScaling is null || RopeScaling.Kind is "default" or "linear" or "llama3",
            $"'rope_scaling' type '{RopeScaling?.Kind}' is not supported (llama3, linear)");
        Require(RopeScaling is null || (RopeScaling.Factor > 0 && double.IsFinite(RopeScaling.Factor)), $"'rope_scaling' factor {RopeScaling?.Factor} must be positive");
        Require(SlidingWindow is null || SlidingWindow > 0, $"'sliding_window' {SlidingWindow} must be positive");
        Require(LayerTypes is null || (LayerTypes.Length == NumHiddenLayers && LayerTypes.All(t => t is "full_attention" or "sliding_attention")),
            $"'layer_types' must list {NumHiddenLayers} entries, each \"full_attention\" or \"sliding_attention\"");
        Require(Activation is "silu" or "gelu_pytorch_tanh" or "gelu" or "gelu_new",
            $"activation '{Activation}' ('hidden_act'/'hidden_activation') is not supported (silu, gelu_pytorch_tanh, gelu, gelu_new)");
        Require(AttnLogitSoftcapping is null || AttnLogitSoftcapping > 0, "'attn_logit_softcapping' must be positive");
        Require(FinalLogitSoftcapping is null || FinalLogitSoftcapping > 0, "'final_logit_softcapping' must be positive");
        Require(TorchDType is null || TorchDTypes.Contains(TorchDType.Replace("torch.", "")),
            $"'torch_dtype' '{TorchDType}' is not a dtype transformers writes ({string.Join(", ", TorchDTypes)})");
        Require(EosTokenIdRaw is null or { ValueKind: JsonValueKind.Null } || (EosTokenIdRaw.Value.ValueKind == JsonValueKind.Array
                ? EosTokenIdRaw.Value.EnumerateArray().All(IsTokenId) : IsTokenId(EosTokenIdRaw.Value)),
            $"'eos_token_id' is {EosTokenIdRaw?.GetRawText()}; it must be a token id or a list of token ids");
        if (Family.MixtureOfExperts)
            Require(NumLocalExperts is > 0 && NumExpertsPerTok > 0 && NumExpertsPerTok <= NumLocalExperts,
                $"'num_local_experts' ({NumLocalExperts}) must be positive and at least 'num_experts_per_tok' ({NumExpertsPerTok})");
    }

    private static bool IsTokenId(JsonElement e) => e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out _);

    public string ToJson()
    {
        var node = JsonSerializer.SerializeToNode(this, Json)!.AsObject();
        node["architectures"] = new JsonArray(Family.Architecture);
        // Gemma's configs name the activation hidden_activation, the others hidden_act.
        if (HiddenActivation is null && HiddenAct is null) node[Family.GemmaNorm ? "hidden_activation" : "hidden_act"] = Activation;
        if (SlidingRopeTheta is { } local && ModelType == "gemma3_text") node["rope_local_base_freq"] = local;
        if (!Family.MixtureOfExperts)
            foreach (var key in new[] { "num_experts_per_tok", "router_aux_loss_coef", "output_router_logits", "router_jitter_noise" }) node.Remove(key);
        if (PartialRotaryFactor == 1.0 && ModelType != "phi3") node.Remove("partial_rotary_factor");
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
