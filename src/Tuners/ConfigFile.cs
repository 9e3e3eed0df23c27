using System.Text;
using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.Safetensors;

namespace LoRAHub.Tuners;

/// <summary>JSON config files of adapter folders (adapter_config.json and method sidecars): written atomically, read with errors that name the file.</summary>
public static class ConfigFile
{
    /// <summary>Writes the keys sorted, indented by 2 (PEFT's json.dump with sort_keys=True), replacing the file atomically.</summary>
    public static void Write(string path, IReadOnlyDictionary<string, object?> config)
    {
        var sorted = new SortedDictionary<string, object?>(config.ToDictionary(), StringComparer.Ordinal);
        var bytes = Encoding.UTF8.GetBytes(JsonSerializer.Serialize(sorted, ConfigFields.Json));
        AtomicFile.Write(path, stream => stream.Write(bytes));
    }

    /// <summary>
    /// The file's top-level JSON object. A missing file is a <see cref="FileNotFoundException"/> saying what the folder
    /// lacks; a file that is not a JSON object is an <see cref="AdapterConfigurationException"/> naming it.
    /// </summary>
    public static JsonDocument Read(string path)
    {
        if (!File.Exists(path))
            throw new FileNotFoundException($"no {Path.GetFileName(path)} in {Path.GetDirectoryName(path)}; is this an adapter folder?", path);
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(File.ReadAllText(path));
        }
        catch (JsonException e)
        {
            throw new AdapterConfigurationException($"{path} is not valid JSON: {e.Message}");
        }
        var kind = doc.RootElement.ValueKind;
        if (kind == JsonValueKind.Object) return doc;
        doc.Dispose();
        throw new AdapterConfigurationException($"{path} holds a JSON {kind}, not an object");
    }

    /// <summary>Reads <paramref name="path"/> into a new <typeparamref name="T"/> through its config fields (<see cref="ConfigFields.Of"/>).</summary>
    public static T Read<T>(string path) where T : new()
    {
        using var doc = Read(path);
        var options = new T();
        ConfigFields.ReadFrom(doc.RootElement, options, ConfigFields.Of(typeof(T)), path);
        return options;
    }

    /// <summary>Writes the config fields of <paramref name="fields"/> from <paramref name="options"/>, plus <paramref name="extra"/> keys.</summary>
    public static void Write(string path, object options, IEnumerable<ConfigField> fields, IReadOnlyDictionary<string, object?>? extra = null)
    {
        var config = new Dictionary<string, object?>(extra ?? new Dictionary<string, object?>());
        ConfigFields.WriteTo(options, fields, config);
        Write(path, config);
    }
}
