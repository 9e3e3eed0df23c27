using System.Text.Json;

namespace LoRAHub.Models.Tokenization;

/// <summary>
/// Reads tokenizer.json fields so that a missing field or one of the wrong JSON kind is an InvalidDataException naming
/// the field (the caller adds the file), where JsonElement's own accessors say only "key not present" or "wrong kind".
/// </summary>
internal static class JsonFields
{
    /// <summary>The field <paramref name="name"/> of an object; missing or null is an error.</summary>
    public static JsonElement Required(this JsonElement obj, string name)
    {
        if (obj.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"expected an object with '{name}', found {Kind(obj)}");
        return obj.TryGetProperty(name, out var v) && v.ValueKind != JsonValueKind.Null ? v : throw new InvalidDataException($"'{name}' is missing");
    }

    public static string RequiredString(this JsonElement obj, string name) => obj.Required(name).AsString(name);

    public static JsonElement.ArrayEnumerator RequiredArray(this JsonElement obj, string name) => obj.Required(name).AsArray(name);

    /// <summary>An optional string field: absent or null gives null, another kind is an error.</summary>
    public static string? OptionalString(this JsonElement obj, string name) =>
        obj.TryGetProperty(name, out var v) && v.ValueKind != JsonValueKind.Null ? v.AsString(name) : null;

    /// <summary>An optional boolean field: absent or null gives <paramref name="fallback"/>, another kind is an error.</summary>
    public static bool OptionalBool(this JsonElement obj, string name, bool fallback = false) =>
        !obj.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null ? fallback
        : v.ValueKind is JsonValueKind.True or JsonValueKind.False ? v.GetBoolean()
        : throw new InvalidDataException($"'{name}' is {Kind(v)}; expected true or false");

    public static string AsString(this JsonElement e, string name) =>
        e.ValueKind == JsonValueKind.String ? e.GetString()! : throw new InvalidDataException($"'{name}' is {Kind(e)}; expected a string");

    public static JsonElement.ArrayEnumerator AsArray(this JsonElement e, string name) =>
        e.ValueKind == JsonValueKind.Array ? e.EnumerateArray() : throw new InvalidDataException($"'{name}' is {Kind(e)}; expected an array");

    public static int AsInt(this JsonElement e, string name) =>
        e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out var v) ? v : throw new InvalidDataException($"'{name}' is {Kind(e)}; expected an integer");

    /// <summary>An object for a component ("normalizer", ...): absent/null is null, another kind than an object is an error.</summary>
    public static JsonElement? OptionalObject(JsonElement? e, string name) =>
        e is not { } v || v.ValueKind == JsonValueKind.Null ? null
        : v.ValueKind == JsonValueKind.Object ? v
        : throw new InvalidDataException($"'{name}' is {Kind(v)}; expected an object with a \"type\" (or null)");

    public static string Kind(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.Object => "an object",
        JsonValueKind.Array => "an array",
        JsonValueKind.String => $"the string {Short(e.GetRawText())}",
        JsonValueKind.Number => $"the number {Short(e.GetRawText())}",
        JsonValueKind.True or JsonValueKind.False => $"the boolean {e.GetRawText()}",
        _ => "null",
    };

    private static string Short(string s) => s.Length <= 40 ? s : s[..40] + "...";
}
