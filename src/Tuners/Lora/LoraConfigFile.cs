using System.Text.Json;
using LoRAHub.Abstractions;

namespace LoRAHub.Tuners.Lora;

/// <summary>
/// adapter_config.json as PEFT's LoraConfig writes it (keys sorted, indent 2) and reads it. The options' own fields come
/// from their <see cref="ConfigKeyAttribute"/> list; <see cref="OtherFields"/> lists the LoraConfig fields LoRAHub does
/// not implement, written at PEFT's defaults and refused (with the reason) when a file sets them.
/// </summary>
public static class LoraConfigFile
{
    public const string FileName = "adapter_config.json";

    /// <summary>A LoraConfig field LoRAHub has no option for: its default, and why a file that sets it cannot load (null: harmless).</summary>
    private sealed record OtherField(string Key, object? Default, string? Unsupported = null, bool Written = true);

    private static readonly OtherField[] OtherFields =
    [
        new("auto_mapping", null),
        new("corda_config", null),
        new("eva_config", null),
        new("ensure_weight_tying", false, "keeping tied embeddings and lm_head tied inside the adapter is not supported; with false, " +
            "modules_to_save gets an untied copy (PEFT's default)"),
        new("layer_replication", null, "layer replication is not supported"),
        new("lora_ga_config", null),
        new("qalora_group_size", 16),
        new("runtime_config", new Dictionary<string, object> { ["ephemeral_gpu_offload"] = false }),
        new("megatron_config", null),
        new("megatron_core", "megatron.core"),
        new("revision", null),
        new("target_parameters", null, "targeting parameters directly is not supported"),
        // PEFT's LoRA variants: a folder that sets one needs that variant (a plugin passes the variants it provides).
        new("use_dora", false, "this is a DoRA adapter (weight-decomposed LoRA); plain LoRA would give wrong outputs. Load it with the \"dora\" method"),
        new("use_qalora", false, "QA-LoRA is not supported"),
        new("alora_invocation_tokens", null, "aLoRA is not supported", Written: false),
        new("velora_config", null, "VeLoRA is not supported", Written: false),
        new("monteclora_config", null, "MonteCLoRA is not supported", Written: false),
        new("use_bdlora", null, "block-diagonal LoRA is not supported", Written: false),
        new("arrow_config", null, "Arrow routing is not supported", Written: false),
        new("kasa_config", null, "KaSA is not supported", Written: false),
    ];

    /// <summary>PEFT's LoRA variant keys (LoraConfig fields tagged is_lora_variant): a plain LoRA folder sets none of them.</summary>
    public static IReadOnlyList<string> VariantKeys { get; } =
        ["use_dora", "use_qalora", "alora_invocation_tokens", "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config"];

    // Inits that rewrite the base weight from data LoRAHub does not have (PiSSA, OLoRA and LoftQ it redoes, as PEFT does).
    private static readonly string[] BaseChangingInits = ["corda", "lora_ga"];

    /// <summary>True for a value PEFT treats as not set: null, false, an empty list or object.</summary>
    public static bool IsUnset(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.Null or JsonValueKind.False or JsonValueKind.Undefined => true,
        JsonValueKind.Array => e.GetArrayLength() == 0,
        JsonValueKind.Object => !e.EnumerateObject().Any(),
        _ => false,
    };

    // Values LoRAHub implements: read as they are (PiSSA and OLoRA then rebuild the residual base on load, as PEFT does).
    private static bool IsKnownInit(string name)
    {
        try
        {
            LoraInit.Parse(name);
            return true;
        }
        catch (ArgumentException)
        {
            return false;
        }
    }

    /// <summary>Writes atomically. <paramref name="targets"/> is the effective target spec (all-linear expanded).</summary>
    public static void Write(string path, LoraOptions options, TargetModuleSpec targets, string baseModel)
    {
        var config = OtherFields.Where(f => f.Written).ToDictionary(f => f.Key, f => f.Default);
        config["base_model_name_or_path"] = baseModel;
        config["inference_mode"] = true; // PeftModel.save_pretrained records inference_mode true
        config["peft_type"] = "LORA";
        var saved = options.Clone();
        saved.TargetModules = targets.Names is { } names ? TargetModuleSpec.FromNames(names.Order(StringComparer.Ordinal)) : targets;
        ConfigFields.WriteTo(saved, ConfigFields.Of(saved.GetType()), config);
        if (options.ResolveLoraVariant() is { } variant && (!config.TryGetValue(variant.ConfigFlag, out var set) || set is null or false))
            config[variant.ConfigFlag] = true;
        ConfigFile.Write(path, config);
    }

    /// <summary>
    /// Reads a PEFT LoRA config; throws AdapterConfigurationException for other methods or unsupported features. A
    /// config that sets the key of one of <paramref name="variants"/> (use_dora) reads into that variant's options.
    /// </summary>
    public static LoraOptions Read(string path, IReadOnlyList<ILoraVariant> variants)
    {
        using var doc = ConfigFile.Read(path);
        var root = doc.RootElement;
        var type = root.TryGetProperty("peft_type", out var pt) ? pt.ValueKind == JsonValueKind.String ? pt.GetString() : pt.GetRawText() : null;
        if (!string.Equals(type, "LORA", StringComparison.OrdinalIgnoreCase))
            throw new AdapterConfigurationException($"{path}: peft_type is '{type}', not 'LORA'; load it with the matching method");
        // PEFT computes the scale from lora_alpha, so a null there is a broken file, not "use the default".
        foreach (var required in (string[])["r", "lora_alpha"])
            if (root.TryGetProperty(required, out var value) && value.ValueKind != JsonValueKind.Number)
                throw new AdapterConfigurationException($"{path}: '{required}' is {value.GetRawText()}, not a number");
        ILoraVariant? variant = null;
        foreach (var candidate in variants)
            if (root.TryGetProperty(candidate.ConfigFlag, out var flag) && !IsUnset(flag))
                variant = variant == null ? candidate
                    : throw new AdapterConfigurationException($"{path}: both '{variant.ConfigFlag}' and '{candidate.ConfigFlag}' are set");
        foreach (var field in OtherFields)
            if (field.Unsupported is { } why && field.Key != variant?.ConfigFlag && root.TryGetProperty(field.Key, out var v) && !IsUnset(v))
                throw new AdapterConfigurationException($"{path}: '{field.Key}' is {v.GetRawText()}: {why}");
        var ignore = new HashSet<string>();
        if (root.TryGetProperty("init_lora_weights", out var init) && init.ValueKind == JsonValueKind.String && !IsKnownInit(init.GetString()!))
        {
            var name = init.GetString()!;
            if (name.StartsWith("pissa", StringComparison.OrdinalIgnoreCase))
                throw new AdapterConfigurationException($"{path}: 'init_lora_weights' is '{name}': use \"pissa\" or \"pissa_niter_N\" (N a whole number)");
            // These inits rewrite the base weights; such an adapter only fits the rewritten base.
            if (BaseChangingInits.Any(p => name.StartsWith(p, StringComparison.OrdinalIgnoreCase)))
                throw new AdapterConfigurationException($"{path}: 'init_lora_weights' is '{name}': the adapter was trained on a modified " +
                    "base model; convert it with PEFT (save_pretrained with path_initial_model_for_weight_conversion) and load the result");
            ignore.Add("init_lora_weights"); // eva, ...: only the starting point differed; trained weights are plain LoRA
        }

        var options = variant?.CreateOptions() ?? new LoraOptions();
        ConfigFields.ReadFrom(root, options, ConfigFields.Of(options.GetType()), path, ignore);
        if (options.TargetModules == null) throw new AdapterConfigurationException($"{path}: 'target_modules' is missing; the adapter cannot be placed");
        return options;
    }
}
