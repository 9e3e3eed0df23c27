using System.Text.Json;
using System.Text.Json.Nodes;
using LoRAHub.Abstractions;

namespace LoRAHub.Plugins.LoRA;

/// <summary>adapter_config.json as PEFT's LoraConfig writes it (keys sorted, indent 2) and reads it.</summary>
internal static class PeftConfigFile
{
    public const string FileName = "adapter_config.json";

    // Fields PEFT can set that change behaviour LoRAHub does not implement: loading such an adapter must fail loudly.
    private static readonly (string key, Func<JsonElement, bool> isDefault, string why)[] Unsupported =
    [
        ("use_dora", e => e.ValueKind is JsonValueKind.False or JsonValueKind.Null,
            "this is a DoRA adapter (weight-decomposed LoRA); plain LoRA would give wrong outputs. Load it with the \"dora\" method"),
        ("layers_to_transform", IsEmpty, "layer selection by index is not supported; list the modules in target_modules"),
        ("layer_replication", IsEmpty, "layer replication is not supported"),
        ("lora_bias", e => e.ValueKind is JsonValueKind.False or JsonValueKind.Null, "lora_bias (a bias on B) is not supported"),
        ("target_parameters", IsEmpty, "targeting parameters directly is not supported"),
        ("trainable_token_indices", IsEmpty, "trainable tokens are not supported"),
        ("use_qalora", e => e.ValueKind is JsonValueKind.False or JsonValueKind.Null, "QA-LoRA is not supported"),
        ("alora_invocation_tokens", IsEmpty, "aLoRA is not supported"),
    ];

    private static readonly string[] BaseChangingInits = ["pissa", "olora", "corda", "loftq", "lora_ga"];

    private static bool IsEmpty(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.Null => true,
        JsonValueKind.Array => e.GetArrayLength() == 0,
        JsonValueKind.Object => !e.EnumerateObject().Any(),
        _ => false,
    };

    /// <summary>Writes atomically. <paramref name="targets"/> is the effective target spec (all-linear expanded).</summary>
    public static void Write(string path, LoraOptions o, TargetModuleSpec targets, string baseModel)
    {
        var config = new SortedDictionary<string, object?>(StringComparer.Ordinal)
        {
            ["alpha_pattern"] = o.AlphaPattern,
            ["auto_mapping"] = null,
            ["base_model_name_or_path"] = baseModel,
            ["bias"] = o.Bias,
            ["corda_config"] = null,
            ["eva_config"] = null,
            ["exclude_modules"] = o.ExcludeModules,
            ["fan_in_fan_out"] = o.FanInFanOut,
            ["inference_mode"] = true, // PeftModel.save_pretrained records inference_mode true
            ["init_lora_weights"] = o.InitLoraWeights.JsonValue,
            ["layer_replication"] = null,
            ["layers_pattern"] = null,
            ["layers_to_transform"] = null,
            ["loftq_config"] = new Dictionary<string, object>(),
            ["lora_alpha"] = o.LoraAlpha,
            ["lora_bias"] = false,
            ["lora_dropout"] = o.LoraDropout,
            ["megatron_config"] = null,
            ["megatron_core"] = "megatron.core",
            ["modules_to_save"] = o.ModulesToSave,
            ["peft_type"] = "LORA",
            ["r"] = o.R,
            ["rank_pattern"] = o.RankPattern,
            ["revision"] = null,
            ["target_modules"] = targets.Names is { } names ? names.Order(StringComparer.Ordinal).ToList() : targets.Pattern,
            ["target_parameters"] = null,
            ["task_type"] = o.TaskType,
            ["trainable_token_indices"] = null,
            ["use_dora"] = false,
            ["use_qalora"] = false,
            ["use_rslora"] = o.UseRslora,
        };
        if (o.ResolveLoraVariant() is { } variant) config[variant.ConfigFlag] = true;
        var json = JsonSerializer.Serialize(config, new JsonSerializerOptions { WriteIndented = true, IndentSize = 2 });
        var temp = path + ".tmp-" + Guid.NewGuid().ToString("N")[..8];
        File.WriteAllText(temp, json);
        File.Move(temp, path, overwrite: true);
    }

    /// <summary>
    /// Reads a PEFT LoRA config; throws AdapterConfigurationException for other methods or unsupported features. A
    /// config that sets the flag of one of <paramref name="variants"/> (use_dora) reads into that variant's options.
    /// </summary>
    public static LoraOptions Read(string path, IReadOnlyList<ILoraVariant> variants)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"no {FileName} in {Path.GetDirectoryName(path)}; is this a PEFT adapter folder?", path);
        using var doc = JsonDocument.Parse(File.ReadAllText(path));
        var root = doc.RootElement;
        string Where(string key) => $"{path}: '{key}'";
        var type = root.TryGetProperty("peft_type", out var pt) ? pt.GetString() : null;
        if (!string.Equals(type, "LORA", StringComparison.OrdinalIgnoreCase))
            throw new AdapterConfigurationException($"{path}: peft_type is '{type}', not 'LORA'; load it with the matching method");
        ILoraVariant? variant = null;
        foreach (var candidate in variants)
            if (root.TryGetProperty(candidate.ConfigFlag, out var flag) && flag.ValueKind == JsonValueKind.True)
                variant = variant == null ? candidate
                    : throw new AdapterConfigurationException($"{path}: both '{variant.ConfigFlag}' and '{candidate.ConfigFlag}' are true");
        foreach (var (key, isDefault, why) in Unsupported)
            if (key != variant?.ConfigFlag && root.TryGetProperty(key, out var v) && !isDefault(v))
                throw new AdapterConfigurationException($"{Where(key)} is {v.GetRawText()}: {why}");
        if (root.TryGetProperty("init_lora_weights", out var init) && init.ValueKind == JsonValueKind.String &&
            init.GetString() is not ("gaussian" or "true" or "false"))
        {
            var name = init.GetString()!;
            // These inits rewrite the base weights; such an adapter only fits the rewritten base.
            if (BaseChangingInits.Any(p => name.StartsWith(p, StringComparison.OrdinalIgnoreCase)))
                throw new AdapterConfigurationException($"{Where("init_lora_weights")} is '{name}': the adapter was trained on a modified " +
                    "base model; convert it with PEFT (save_pretrained with path_initial_model_for_weight_conversion) and load the result");
            init = default; // eva, orthogonal, ...: only the starting point differed; trained weights are plain LoRA
        }

        var o = variant?.CreateOptions() ?? new LoraOptions();
        try
        {
            if (Get(root, "r") is { } r) o.R = r.GetInt32();
            if (Get(root, "lora_alpha") is { } alpha) o.LoraAlpha = alpha.GetDouble();
            if (Get(root, "lora_dropout") is { } dropout) o.LoraDropout = dropout.GetDouble();
            if (Get(root, "target_modules") is { } targets) o.TargetModules = targets.Deserialize<TargetModuleSpec>();
            if (Get(root, "exclude_modules") is { } exclude) o.ExcludeModules = exclude.Deserialize<TargetModuleSpec>();
            if (Get(root, "bias") is { } bias) o.Bias = bias.GetString()!;
            if (Get(root, "use_rslora") is { } rs) o.UseRslora = rs.GetBoolean();
            if (init.ValueKind != JsonValueKind.Undefined && init.ValueKind != JsonValueKind.Null) o.InitLoraWeights = init.Deserialize<LoraInit>()!;
            if (Get(root, "rank_pattern") is { } rp) o.RankPattern = rp.Deserialize<Dictionary<string, int>>()!;
            if (Get(root, "alpha_pattern") is { } ap) o.AlphaPattern = ap.Deserialize<Dictionary<string, double>>()!;
            if (Get(root, "modules_to_save") is { } mts) o.ModulesToSave = mts.Deserialize<List<string>>();
            if (Get(root, "fan_in_fan_out") is { } fan) o.FanInFanOut = fan.GetBoolean();
            if (Get(root, "task_type") is { } task) o.TaskType = task.GetString()!;
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException or ArgumentException)
        {
            throw new AdapterConfigurationException($"{path}: invalid LoRA config ({e.Message})");
        }
        if (o.TargetModules == null) throw new AdapterConfigurationException($"{Where("target_modules")} is missing; the adapter cannot be placed");
        return o;
    }

    private static JsonElement? Get(JsonElement root, string key) =>
        root.TryGetProperty(key, out var v) && v.ValueKind != JsonValueKind.Null ? v : null;
}
