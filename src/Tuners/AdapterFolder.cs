using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.Tuners.Lora;

namespace LoRAHub.Tuners;

/// <summary>
/// What a saved adapter folder says about the method that wrote it (for <see cref="IAdapterMethod.Claims"/>), and the
/// choice of the one method that claims a folder, so a folder loads without naming its method (PEFT picks the tuner
/// from peft_type; LoRA-family methods share peft_type LORA and are told apart by telltales).
/// </summary>
public static class AdapterFolder
{
    public const string PeftConfigFile = "adapter_config.json";

    /// <summary>adapter_config.json's peft_type ("LORA", "ADALORA", ...), or null when the folder has none or it is unreadable.</summary>
    public static string? PeftType(string directory) =>
        ReadPeftConfig(directory, root => root.TryGetProperty("peft_type", out var t) && t.ValueKind == JsonValueKind.String ? t.GetString() : null);

    /// <summary>Whether adapter_config.json sets <paramref name="key"/> (true, or a non-empty value).</summary>
    public static bool Sets(string directory, string key) =>
        ReadPeftConfig(directory, root => root.TryGetProperty(key, out var v) && !LoraConfigFile.IsUnset(v));

    /// <summary>
    /// The method config files beside adapter_config.json: "&lt;method&gt;_config.json" (qlora_config.json,
    /// longlora_config.json, malora_config.json, galore_config.json, ...), sorted.
    /// </summary>
    public static IReadOnlyList<string> MethodConfigFiles(string directory) =>
        Directory.Exists(directory)
            ? Directory.GetFiles(directory, "*_config.json").Select(Path.GetFileName).Cast<string>()
                .Where(n => n != PeftConfigFile).Order(StringComparer.Ordinal).ToList()
            : [];

    /// <summary>
    /// A PEFT LoRA folder (peft_type LORA) written by one LoRA-family method: of the LoRA variant keys it sets exactly
    /// <paramref name="variantKey"/> (none for null: plain LoRA), and of method config files it has exactly
    /// <paramref name="methodConfigFile"/> (none for null).
    /// </summary>
    public static bool IsLoraFolder(string directory, string? variantKey = null, string? methodConfigFile = null)
    {
        if (!string.Equals(PeftType(directory), "LORA", StringComparison.OrdinalIgnoreCase)) return false;
        var variants = LoraConfigFile.VariantKeys.Append(variantKey).OfType<string>().Distinct().Where(k => Sets(directory, k)).ToList();
        if (!variants.SequenceEqual(variantKey is null ? [] : [variantKey])) return false;
        return MethodConfigFiles(directory).SequenceEqual(methodConfigFile is null ? [] : [methodConfigFile]);
    }

    /// <summary>
    /// The one method among <paramref name="methods"/> that claims the folder. None, or more than one, is an
    /// <see cref="AdapterConfigurationException"/> naming the candidates (through <paramref name="label"/>, e.g. with
    /// their plugin) and what the folder holds; a method whose <see cref="IAdapterMethod.Claims"/> throws is named too.
    /// A model folder (<see cref="IsModelFolder"/>) that none claims is an <see cref="ArgumentException"/> saying so.
    /// </summary>
    public static IAdapterMethod Claimant(IEnumerable<IAdapterMethod> methods, string directory, Func<IAdapterMethod, string>? label = null)
    {
        if (!Directory.Exists(directory)) throw new DirectoryNotFoundException($"adapter folder {directory} does not exist");
        label ??= m => m.Name;
        var all = methods.ToList();
        var claimants = all.Where(m => Claims(m, directory, label)).ToList();
        return claimants.Count switch
        {
            1 => claimants[0],
            // A model folder where an adapter belongs (arguments swapped, a model given to -a) is bad input, not a bad adapter.
            0 when IsModelFolder(directory) => throw new ArgumentException($"{Path.GetFullPath(directory)} is a model folder (config.json), not an " +
                $"adapter ({PeftConfigFile}); pass it as the base model and the adapter's folder as the adapter (merge: base model first, then the adapter)"),
            0 => throw new AdapterConfigurationException(NotAnAdapter(directory) ?? $"no method claims the folder {directory} " +
                $"({Describe(directory)}); methods: {string.Join(", ", all.Select(label))}. If a plugin wrote it, install that plugin " +
                "(dotnet loraHub methods lists the ones found); a script can name the method: Method(\"name\").Load(model, folder)"),
            // Two methods reading one format the same way is a plugin bug: loading either could silently be the wrong one.
            _ => throw new AdapterConfigurationException($"several methods claim the folder {directory} ({Describe(directory)}): " +
                $"{string.Join(", ", claimants.Select(label))}; exactly one must. Load it with the method that saved it: Method(\"name\").Load(model, folder)"),
        };
    }

    private static bool Claims(IAdapterMethod method, string directory, Func<IAdapterMethod, string> label)
    {
        try
        {
            return method.Claims(directory);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            throw new AdapterConfigurationException($"method {label(method)} failed to inspect {directory}: {e.Message}");
        }
    }

    /// <summary>Loads the folder with the one method that claims it (<see cref="Claimant"/>).</summary>
    public static IAdapter Load(IEnumerable<IAdapterMethod> methods, IAdaptableModel model, string directory) =>
        Claimant(methods, directory).Load(model, directory);

    /// <summary>
    /// Why no method could claim the folder when its adapter_config.json (which PEFT and every built-in method write) is
    /// unreadable, or missing where the folder is a run's, with what to pass instead; else null.
    /// </summary>
    private static string? NotAnAdapter(string directory)
    {
        var path = Path.Combine(directory, PeftConfigFile);
        if (!File.Exists(path))
        {
            var inner = Path.Combine(directory, "adapter"); // a training run's or checkpoint's adapter
            if (File.Exists(Path.Combine(inner, PeftConfigFile)))
                return $"{directory} has no {PeftConfigFile}, but {inner} has: pass that folder (the adapter a run or checkpoint saved)";
            return null; // a plugin's own format, maybe: the general message lists the methods and the files
        }
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            if (doc.RootElement.ValueKind != JsonValueKind.Object) return $"{path} is not a JSON object";
            return doc.RootElement.TryGetProperty("peft_type", out var t) && t.ValueKind == JsonValueKind.String ? null
                : $"{path} has no peft_type (PEFT writes one, e.g. \"LORA\"): add it, or save the adapter again";
        }
        catch (JsonException e)
        {
            return $"{path} is not valid JSON ({e.Message}): it was cut short or edited; save the adapter again or repair the file";
        }
    }

    /// <summary>A model's folder (config.json) and no adapter's (no adapter_config.json).</summary>
    public static bool IsModelFolder(string directory) =>
        File.Exists(Path.Combine(directory, "config.json")) && !File.Exists(Path.Combine(directory, PeftConfigFile));

    /// <summary>adapter_config.json's base_model_name_or_path, or null when it is missing or empty or the file does not parse.</summary>
    public static string? BaseModelName(string directory) =>
        ReadPeftConfig(directory, root => root.TryGetProperty("base_model_name_or_path", out var v) && v.ValueKind == JsonValueKind.String
            && v.GetString() is { Length: > 0 } name ? name : null);

    private static string Describe(string directory)
    {
        var files = Directory.GetFiles(directory).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToList();
        var type = PeftType(directory);
        return (type is null ? "" : $"peft_type {type}; ") + $"files: {(files.Count == 0 ? "none" : string.Join(", ", files))}";
    }

    private static T? ReadPeftConfig<T>(string directory, Func<JsonElement, T> read)
    {
        var path = Path.Combine(directory, PeftConfigFile);
        if (!File.Exists(path)) return default;
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            return doc.RootElement.ValueKind == JsonValueKind.Object ? read(doc.RootElement) : default;
        }
        catch (JsonException)
        {
            return default; // not claimed; loading it by name reports the broken file
        }
    }
}
