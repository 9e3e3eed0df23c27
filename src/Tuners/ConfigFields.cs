using System.Collections.Concurrent;
using System.Reflection;
using System.Text.Json;
using System.Text.Json.Serialization;
using LoRAHub.Abstractions;

namespace LoRAHub.Tuners;

/// <summary>
/// An options class's config fields (its <see cref="ConfigKeyAttribute"/> properties) and what is generated from them:
/// writing into a config dictionary, reading from a config file's JSON, and copying between options objects.
/// </summary>
public static class ConfigFields
{
    /// <summary>How config values are (de)serialized: enums by name, NaN and infinities as JSON strings.</summary>
    public static JsonSerializerOptions Json { get; } = new()
    {
        Converters = { new JsonStringEnumConverter() },
        NumberHandling = JsonNumberHandling.AllowNamedFloatingPointLiterals,
        WriteIndented = true,
        IndentSize = 2,
    };

    private static readonly ConcurrentDictionary<(Type, bool), IReadOnlyList<ConfigField>> Cache = new();

    /// <summary>The fields of <paramref name="type"/> and its base classes, base class first.</summary>
    public static IReadOnlyList<ConfigField> Of(Type type) => Cache.GetOrAdd((type, false), k => Collect(k.Item1, inherited: true));

    /// <summary>Only the fields <paramref name="type"/> itself declares (what a method adds to the options it extends).</summary>
    public static IReadOnlyList<ConfigField> DeclaredOn(Type type) => Cache.GetOrAdd((type, true), k => Collect(k.Item1, inherited: false));

    private static List<ConfigField> Collect(Type type, bool inherited)
    {
        var chain = new List<Type>();
        for (var t = type; t is not null && t != typeof(object); t = inherited ? t.BaseType : null) chain.Insert(0, t);
        return chain.SelectMany(t => t.GetProperties(BindingFlags.Public | BindingFlags.Instance | BindingFlags.DeclaredOnly))
            .Where(p => p.CanRead && p.CanWrite)
            .Select(p => (property: p, key: p.GetCustomAttribute<ConfigKeyAttribute>()?.Key))
            .Where(p => p.key is not null)
            .Select(p => new ConfigField(p.key!, p.property))
            .ToList();
    }

    /// <summary>Sets config[key] to each field's value (as the property holds it; <see cref="ConfigFile.Write"/> serializes).</summary>
    public static void WriteTo(object options, IEnumerable<ConfigField> fields, IDictionary<string, object?> config)
    {
        foreach (var field in fields) config[field.Key] = field.Property.GetValue(options);
    }

    /// <summary>
    /// Sets every field whose key the JSON object has with a non-null value; other fields keep their defaults. A value of
    /// the wrong kind is an <see cref="AdapterConfigurationException"/> naming <paramref name="file"/> and the key.
    /// </summary>
    public static void ReadFrom(JsonElement root, object options, IEnumerable<ConfigField> fields, string file, IReadOnlySet<string>? ignore = null)
    {
        foreach (var field in fields)
        {
            if (ignore?.Contains(field.Key) == true) continue;
            if (!root.TryGetProperty(field.Key, out var value) || value.ValueKind == JsonValueKind.Null) continue;
            try
            {
                field.Property.SetValue(options, value.Deserialize(field.Property.PropertyType, JsonFor(field.Property)));
            }
            catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException or ArgumentException or NotSupportedException
                                          or TargetInvocationException)
            {
                throw new AdapterConfigurationException($"{file}: '{field.Key}' is {value.GetRawText()}, which is not a valid {field.Property.PropertyType.Name} " +
                                                        $"({(e as TargetInvocationException)?.InnerException?.Message ?? e.Message})");
            }
        }
    }

    // A property's own [JsonConverter] (e.g. PEFT's "int or list" fields) applies when its value is read on its own.
    private static readonly ConcurrentDictionary<PropertyInfo, JsonSerializerOptions> PropertyJson = new();

    private static JsonSerializerOptions JsonFor(PropertyInfo property) =>
        property.GetCustomAttribute<JsonConverterAttribute>() is { ConverterType: { } type }
            ? PropertyJson.GetOrAdd(property, _ => new JsonSerializerOptions(Json) { Converters = { (JsonConverter)Activator.CreateInstance(type)! } })
            : Json;

    /// <summary>
    /// Copies every public settable property declared on <paramref name="declaredOn"/> and its base classes (options that
    /// are not saved too, e.g. LoRA+'s ratio) from <paramref name="source"/> into <paramref name="target"/>. Values that are
    /// not plain values (lists, dictionaries) are copied, so the two objects never share a collection.
    /// </summary>
    public static void Copy(object source, object target, Type declaredOn)
    {
        if (!declaredOn.IsInstanceOfType(source) || !declaredOn.IsInstanceOfType(target))
            throw new ArgumentException($"both objects must be {declaredOn.Name}s (got {source.GetType().Name} and {target.GetType().Name})");
        for (var t = declaredOn; t is not null && t != typeof(object); t = t.BaseType)
            foreach (var p in t.GetProperties(BindingFlags.Public | BindingFlags.Instance | BindingFlags.DeclaredOnly).Where(p => p.CanRead && p.CanWrite))
                p.SetValue(target, CopyOf(p.GetValue(source), p.PropertyType));
    }

    private static object? CopyOf(object? value, Type type) =>
        value is null || value is string || value.GetType().IsValueType || IsImmutable(value.GetType())
            ? value
            : JsonSerializer.SerializeToElement(value, type, Json).Deserialize(type, Json);

    // Our option value types that never change after construction (a copy would only cost time).
    private static bool IsImmutable(Type t) => t == typeof(TargetModuleSpec) || t == typeof(Lora.LoraInit) || t == typeof(Lora.TrainableTokenIndices);
}

/// <summary>One config field: the key a file stores it under and the options property that holds it.</summary>
public sealed record ConfigField(string Key, PropertyInfo Property);
