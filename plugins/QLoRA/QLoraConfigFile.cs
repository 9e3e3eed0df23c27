using System.Text.Json;
using LoRAHub.Abstractions;

namespace LoRAHub.Plugins.QLoRA;

/// <summary>
/// qlora_config.json beside a saved adapter: the 4-bit settings under transformers' quantization_config names, so the
/// adapter is loaded onto the same quantization. PEFT ignores the file (it loads adapter_config.json and the weights).
/// </summary>
internal static class QLoraConfigFile
{
    public const string FileName = "qlora_config.json";

    public static void Write(string path, QLoraOptions o)
    {
        var config = new SortedDictionary<string, object?>(StringComparer.Ordinal)
        {
            ["bnb_4bit_blocksize"] = o.Bnb4bitBlocksize,
            ["bnb_4bit_compute_dtype"] = o.Bnb4bitComputeDtype,
            ["bnb_4bit_quant_type"] = o.Bnb4bitQuantType,
            ["bnb_4bit_use_double_quant"] = o.Bnb4bitUseDoubleQuant,
            ["llm_int8_skip_modules"] = o.SkipModules,
            ["load_in_4bit"] = true,
            ["paged_optimizer"] = o.PagedOptimizer,
            ["quant_method"] = "bitsandbytes",
        };
        var temp = path + ".tmp-" + Guid.NewGuid().ToString("N")[..8];
        File.WriteAllText(temp, JsonSerializer.Serialize(config, new JsonSerializerOptions { WriteIndented = true, IndentSize = 2 }));
        File.Move(temp, path, overwrite: true);
    }

    /// <summary>The 4-bit settings of a saved adapter folder, applied to <paramref name="into"/>; defaults where the file is absent.</summary>
    public static void Read(string directory, QLoraOptions into)
    {
        var path = Path.Combine(directory, FileName);
        if (!File.Exists(path)) return;
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            var root = doc.RootElement;
            if (root.TryGetProperty("bnb_4bit_quant_type", out var t)) into.Bnb4bitQuantType = t.GetString() ?? into.Bnb4bitQuantType;
            if (root.TryGetProperty("bnb_4bit_use_double_quant", out var d)) into.Bnb4bitUseDoubleQuant = d.GetBoolean();
            if (root.TryGetProperty("bnb_4bit_compute_dtype", out var c)) into.Bnb4bitComputeDtype = c.GetString() ?? into.Bnb4bitComputeDtype;
            if (root.TryGetProperty("bnb_4bit_blocksize", out var b)) into.Bnb4bitBlocksize = b.GetInt32();
            if (root.TryGetProperty("llm_int8_skip_modules", out var s) && s.ValueKind == JsonValueKind.Array)
                into.SkipModules = s.EnumerateArray().Select(e => e.GetString() ?? "").ToList();
            if (root.TryGetProperty("paged_optimizer", out var p)) into.PagedOptimizer = p.GetBoolean();
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException)
        {
            throw new AdapterConfigurationException($"{path}: invalid QLoRA config ({e.Message})");
        }
    }

    /// <summary>modules_to_save of a PEFT adapter_config.json (those modules stay unquantized), or none.</summary>
    public static List<string> ModulesToSave(string directory)
    {
        var path = Path.Combine(directory, "adapter_config.json");
        if (!File.Exists(path)) return [];
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            return doc.RootElement.TryGetProperty("modules_to_save", out var m) && m.ValueKind == JsonValueKind.Array
                ? m.EnumerateArray().Select(e => e.GetString() ?? "").Where(s => s.Length > 0).ToList()
                : [];
        }
        catch (JsonException)
        {
            return []; // the LoRA loader reports the broken file with its own message
        }
    }
}
