using System.Text.Json;
using System.Text.Json.Nodes;
using LoRAHub.TorchExtensions.Quantization;
using static TorchSharp.torch;

namespace LoRAHub.Models;

/// <summary>
/// transformers' BitsAndBytesConfig for 4-bit loading, as config.json's quantization_config holds it: which Linear layers
/// become 4-bit (all but the output head and llm_int8_skip_modules), NF4 or FP4, double quantization, the compute dtype.
/// </summary>
public sealed record BitsAndBytesConfig
{
    public string Bnb4bitQuantType { get; init; } = "nf4";
    public bool Bnb4bitUseDoubleQuant { get; init; } = true;
    public ScalarType Bnb4bitComputeDtype { get; init; } = ScalarType.BFloat16;
    /// <summary>bitsandbytes' blocksize (64; not part of quantization_config, which has no key for it).</summary>
    public int Blocksize { get; init; } = 64;
    /// <summary>Module names kept dense, matched as PEFT does: the full dotted path or its last names.</summary>
    public IReadOnlyList<string> LlmInt8SkipModules { get; init; } = [];

    /// <summary>Whether <paramref name="path"/> is kept dense (a skip module or inside one).</summary>
    public bool Skips(string path) => LlmInt8SkipModules.Any(s => path == s || path.EndsWith("." + s, StringComparison.Ordinal) ||
        path.StartsWith(s + ".", StringComparison.Ordinal) || path.Contains("." + s + ".", StringComparison.Ordinal));

    /// <summary>
    /// The 4-bit quantization_config of a config.json, or null when it has none; a quantization config we cannot load
    /// (8-bit, another quant_method) is refused naming it.
    /// </summary>
    public static BitsAndBytesConfig? FromConfigJson(string json, string source)
    {
        try
        {
            return JsonNode.Parse(json) is JsonObject root && root["quantization_config"] is JsonObject q ? FromQuantizationConfig(q, source) : null;
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException)
        {
            // A value of the wrong JSON type (e.g. "load_in_4bit": "yes").
            throw new InvalidDataException($"{source}: invalid 'quantization_config' ({e.Message})", e);
        }
    }

    private static BitsAndBytesConfig FromQuantizationConfig(JsonObject q, string source)
    {
        var method = q["quant_method"]?.GetValue<string>() ?? "bitsandbytes";
        if (method != "bitsandbytes" || q["load_in_4bit"]?.GetValue<bool>() != true)
            throw new NotSupportedException($"{source}: quantization_config (quant_method '{method}', load_in_4bit {q["load_in_4bit"]?.ToJsonString() ?? "absent"}, " +
                $"load_in_8bit {q["load_in_8bit"]?.ToJsonString() ?? "absent"}) is not a bitsandbytes 4-bit model; only bitsandbytes 4-bit (NF4/FP4) folders load quantized");
        var storage = q["bnb_4bit_quant_storage"]?.GetValue<string>() ?? "uint8";
        if (storage != "uint8") throw new NotSupportedException($"{source}: bnb_4bit_quant_storage '{storage}' is not supported (uint8)");
        var type = q["bnb_4bit_quant_type"]?.GetValue<string>() ?? "fp4";
        if (!FourBit.QuantTypes.Contains(type)) throw new InvalidDataException($"{source}: bnb_4bit_quant_type '{type}' is neither nf4 nor fp4");
        return new BitsAndBytesConfig
        {
            Bnb4bitQuantType = type,
            Bnb4bitUseDoubleQuant = q["bnb_4bit_use_double_quant"]?.GetValue<bool>() ?? false,
            Bnb4bitComputeDtype = ParseDType(q["bnb_4bit_compute_dtype"]?.GetValue<string>() ?? "float32", source),
            LlmInt8SkipModules = q["llm_int8_skip_modules"] is JsonArray skip ? skip.Select(s => s!.GetValue<string>()).ToList() : [],
        };
    }

    /// <summary>The quantization_config transformers writes for this configuration.</summary>
    public JsonObject ToJson() => new()
    {
        ["_load_in_4bit"] = true,
        ["_load_in_8bit"] = false,
        ["bnb_4bit_compute_dtype"] = BitsAndBytesFormat.DTypeName(Bnb4bitComputeDtype),
        ["bnb_4bit_quant_storage"] = "uint8",
        ["bnb_4bit_quant_type"] = Bnb4bitQuantType,
        ["bnb_4bit_use_double_quant"] = Bnb4bitUseDoubleQuant,
        ["llm_int8_enable_fp32_cpu_offload"] = false,
        ["llm_int8_has_fp16_weight"] = false,
        ["llm_int8_skip_modules"] = LlmInt8SkipModules.Count == 0 ? null : new JsonArray(LlmInt8SkipModules.Select(s => (JsonNode)s).ToArray()),
        ["llm_int8_threshold"] = 6.0,
        ["load_in_4bit"] = true,
        ["load_in_8bit"] = false,
        ["quant_method"] = "bitsandbytes",
    };

    private static ScalarType ParseDType(string name, string source) => name.Replace("torch.", "") switch
    {
        "bfloat16" => ScalarType.BFloat16,
        "float16" => ScalarType.Float16,
        "float32" => ScalarType.Float32,
        _ => throw new InvalidDataException($"{source}: bnb_4bit_compute_dtype '{name}' is not bfloat16, float16 or float32"),
    };
}
