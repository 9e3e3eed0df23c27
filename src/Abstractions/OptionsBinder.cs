using System.Reflection;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace LoRAHub.Abstractions;

/// <summary>
/// Binds method options from what a script or config supplies: the typed object itself, an anonymous object
/// (new { r = 16, lora_alpha = 32 }), a dictionary, or JSON. Unknown keys are an error naming the valid ones.
/// Property names match case-insensitively and ignore '_' so r, lora_alpha and LoraAlpha all work.
/// </summary>
public static class OptionsBinder
{
    private static readonly JsonSerializerOptions Json = new()
    {
        PropertyNameCaseInsensitive = true,
        NumberHandling = JsonNumberHandling.AllowReadingFromString,
        Converters = { new JsonStringEnumConverter() },
    };

    public static T Bind<T>(object source) where T : class, new() => (T)Bind(typeof(T), source);

    public static object Bind(Type optionsType, object source)
    {
        if (optionsType.IsInstanceOfType(source)) return source;
        return source switch
        {
            string json => FromJson(optionsType, json),
            JsonElement element => FromJson(optionsType, element.GetRawText()),
            IEnumerable<KeyValuePair<string, object?>> pairs => FromPairs(optionsType, pairs),
            _ => FromPairs(optionsType, source.GetType().GetProperties(BindingFlags.Public | BindingFlags.Instance)
                .Select(p => new KeyValuePair<string, object?>(p.Name, p.GetValue(source)))),
        };
    }

    private static string Normalize(string name) => name.Replace("_", "").ToLowerInvariant();

    private static object FromJson(Type type, string json)
    {
        using var doc = JsonDocument.Parse(json);
        if (doc.RootElement.ValueKind != JsonValueKind.Object)
            throw new AdapterConfigurationException($"options for {type.Name} must be a JSON object");
        return FromPairs(type, doc.RootElement.EnumerateObject().Select(p => new KeyValuePair<string, object?>(p.Name, p.Value.Clone())));
    }

    private static object FromPairs(Type type, IEnumerable<KeyValuePair<string, object?>> pairs)
    {
        var target = Activator.CreateInstance(type)!;
        var props = type.GetProperties(BindingFlags.Public | BindingFlags.Instance).Where(p => p.CanWrite)
            .ToDictionary(p => Normalize(p.Name));
        foreach (var (key, value) in pairs)
        {
            if (!props.TryGetValue(Normalize(key), out var prop))
                throw new AdapterConfigurationException(
                    $"unknown option '{key}' for {type.Name}; valid options: {string.Join(", ", props.Values.Select(p => p.Name))}");
            try
            {
                prop.SetValue(target, Convert(value, prop));
            }
            catch (Exception e) when (e is not AdapterConfigurationException)
            {
                throw new AdapterConfigurationException($"option '{key}' of {type.Name}: cannot use {Describe(value)} as {prop.PropertyType.Name} ({e.Message})");
            }
        }
        return target;
    }

    private static object? Convert(object? value, PropertyInfo property)
    {
        var target = property.PropertyType;
        if (value is null) return null;
        if (target.IsInstanceOfType(value)) return value;
        var element = value as JsonElement? ?? JsonSerializer.SerializeToElement(value, value.GetType());
        return element.Deserialize(target, JsonFor(property));
    }

    // A property's own [JsonConverter] (PEFT's "one or a list" fields such as layers_pattern) applies to its value.
    private static readonly System.Collections.Concurrent.ConcurrentDictionary<PropertyInfo, JsonSerializerOptions> PropertyJson = new();

    private static JsonSerializerOptions JsonFor(PropertyInfo property) =>
        property.GetCustomAttribute<JsonConverterAttribute>() is { ConverterType: { } type }
            ? PropertyJson.GetOrAdd(property, _ => new JsonSerializerOptions(Json) { Converters = { (JsonConverter)Activator.CreateInstance(type)! } })
            : Json;

    private static string Describe(object? value) => value is null ? "null" : $"'{value}' ({value.GetType().Name})";
}
