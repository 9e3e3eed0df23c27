using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;

namespace LoRAHub.Models.Gpt2;

/// <summary>GPT-2 configuration as in transformers' config.json (n_embd, n_layer, n_head, n_positions, ...).</summary>
public sealed class Gpt2Config
{
    [JsonPropertyName("model_type")] public string ModelType { get; set; } = "gpt2";
    [JsonPropertyName("vocab_size")] public int VocabSize { get; set; } = 50257;
    [JsonPropertyName("n_positions")] public int NPositions { get; set; } = 1024;
    [JsonPropertyName("n_embd")] public int NEmbd { get; set; } = 768;
    [JsonPropertyName("n_layer")] public int NLayer { get; set; } = 12;
    [JsonPropertyName("n_head")] public int NHead { get; set; } = 12;
    /// <summary>MLP width; transformers' default (null) is 4 · n_embd.</summary>
    [JsonPropertyName("n_inner")] public int? NInner { get; set; }
    [JsonPropertyName("layer_norm_epsilon")] public double LayerNormEpsilon { get; set; } = 1e-5;
    [JsonPropertyName("activation_function")] public string ActivationFunction { get; set; } = "gelu_new";
    [JsonPropertyName("bos_token_id")] public int? BosTokenId { get; set; } = 50256;
    [JsonPropertyName("eos_token_id")] public int? EosTokenId { get; set; } = 50256;
    [JsonPropertyName("tie_word_embeddings")] public bool TieWordEmbeddings { get; set; } = true;
    [JsonPropertyName("torch_dtype")] public string? TorchDType { get; set; }

    public int Inner => NInner ?? 4 * NEmbd;

    private static readonly JsonSerializerOptions Json = new() { WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull };

    public static Gpt2Config FromJson(string json, string source = "config.json")
    {
        Gpt2Config config;
        try
        {
            config = JsonSerializer.Deserialize<Gpt2Config>(json, Json) ?? throw new JsonException("empty");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{source}: not a valid GPT-2 config ({e.Message})", e);
        }
        if (config.NEmbd % config.NHead != 0) throw new InvalidDataException($"{source}: n_embd {config.NEmbd} is not divisible by n_head {config.NHead}");
        if (config.ActivationFunction is not ("gelu_new" or "gelu_pytorch_tanh" or "gelu"))
            throw new NotSupportedException($"{source}: activation_function '{config.ActivationFunction}' is not supported (gelu_new, gelu_pytorch_tanh, gelu)");
        return config;
    }

    public string ToJson()
    {
        var node = JsonSerializer.SerializeToNode(this, Json)!.AsObject();
        node["architectures"] = new JsonArray("GPT2LMHeadModel");
        return node.ToJsonString(Json);
    }
}
