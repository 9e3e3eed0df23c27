using System.Text.Json;
using System.Text.Json.Serialization;

namespace LoRAHub.Tuners;

/// <summary>
/// Reads PEFT's "one value or a list" fields (layers_to_transform: int | list[int], layers_pattern: str | list[str]) as a
/// list; writes the list.
/// </summary>
public sealed class OneOrManyConverter<T> : JsonConverter<List<T>>
{
    public override List<T>? Read(ref Utf8JsonReader reader, Type typeToConvert, JsonSerializerOptions options)
    {
        if (reader.TokenType == JsonTokenType.Null) return null;
        if (reader.TokenType != JsonTokenType.StartArray) return [JsonSerializer.Deserialize<T>(ref reader, options)!];
        var list = new List<T>();
        while (reader.Read() && reader.TokenType != JsonTokenType.EndArray) list.Add(JsonSerializer.Deserialize<T>(ref reader, options)!);
        return list;
    }

    public override void Write(Utf8JsonWriter writer, List<T> value, JsonSerializerOptions options)
    {
        writer.WriteStartArray();
        foreach (var item in value) JsonSerializer.Serialize(writer, item, options);
        writer.WriteEndArray();
    }
}
