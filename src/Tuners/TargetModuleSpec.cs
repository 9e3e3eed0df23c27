using System.Text.Json;
using System.Text.Json.Serialization;
using System.Text.RegularExpressions;

namespace LoRAHub.Tuners;

/// <summary>
/// Which modules an option selects, in PEFT's two spellings: a list of names (a module matches when its path equals
/// a name or ends with "." + name) or one string, a regular expression matched against the whole path.
/// The string "all-linear" is PEFT's shorthand for every Linear except the output head.
/// </summary>
[JsonConverter(typeof(TargetModuleSpecConverter))]
public sealed class TargetModuleSpec
{
    public const string AllLinear = "all-linear";

    private readonly Regex? regex;

    private TargetModuleSpec(IReadOnlyList<string>? names, string? pattern)
    {
        Names = names;
        Pattern = pattern;
        if (pattern != null && !IsAllLinear) regex = new Regex($"^(?:{pattern})$", RegexOptions.CultureInvariant);
    }

    /// <summary>The list form, or null for the regex form.</summary>
    public IReadOnlyList<string>? Names { get; }

    /// <summary>The string form (a regex or "all-linear"), or null for the list form.</summary>
    public string? Pattern { get; }

    public bool IsAllLinear => string.Equals(Pattern, AllLinear, StringComparison.OrdinalIgnoreCase);

    public static TargetModuleSpec FromNames(IEnumerable<string> names) => new(names.ToList(), null);

    /// <summary>A regex (throws ArgumentException when it does not compile) or "all-linear".</summary>
    public static TargetModuleSpec FromPattern(string pattern) => new(null, pattern);

    public static implicit operator TargetModuleSpec(string pattern) => FromPattern(pattern);
    public static implicit operator TargetModuleSpec(string[] names) => FromNames(names);
    public static implicit operator TargetModuleSpec(List<string> names) => FromNames(names);

    /// <summary>Whether the spec names the dotted module path ("all-linear" must be expanded first); see <see cref="TargetSelection.Matches"/>.</summary>
    public bool Matches(string path)
    {
        if (IsAllLinear) throw new InvalidOperationException("expand 'all-linear' to module names before matching");
        if (regex != null) return regex.IsMatch(path);
        return Names!.Any(n => path == n || path.EndsWith("." + n, StringComparison.Ordinal));
    }

    public override string ToString() => Pattern != null ? $"'{Pattern}'" : "[" + string.Join(", ", Names!) + "]";
}

/// <summary>Reads a JSON string or array of strings; writes them back the same way.</summary>
public sealed class TargetModuleSpecConverter : JsonConverter<TargetModuleSpec>
{
    public override TargetModuleSpec? Read(ref Utf8JsonReader reader, Type typeToConvert, JsonSerializerOptions options)
    {
        switch (reader.TokenType)
        {
            case JsonTokenType.Null:
                return null;
            case JsonTokenType.String:
                return TargetModuleSpec.FromPattern(reader.GetString()!);
            case JsonTokenType.StartArray:
                var names = new List<string>();
                while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
                    names.Add(reader.TokenType == JsonTokenType.String ? reader.GetString()! : throw new JsonException("module names must be strings"));
                return TargetModuleSpec.FromNames(names);
            default:
                throw new JsonException("expected a regex string or a list of module names");
        }
    }

    public override void Write(Utf8JsonWriter writer, TargetModuleSpec value, JsonSerializerOptions options)
    {
        if (value.Pattern != null)
        {
            writer.WriteStringValue(value.Pattern);
            return;
        }
        writer.WriteStartArray();
        foreach (var n in value.Names!) writer.WriteStringValue(n);
        writer.WriteEndArray();
    }
}
