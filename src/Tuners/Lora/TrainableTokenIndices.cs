using System.Text.Json;
using System.Text.Json.Serialization;

namespace LoRAHub.Tuners.Lora;

/// <summary>
/// PEFT's trainable_token_indices: a list of token ids (rows of the input embedding to train) or a dict from module name
/// ("embed_tokens", "lm_head") to its list. Written back in the form it was given.
/// </summary>
[JsonConverter(typeof(TrainableTokenIndicesConverter))]
public sealed class TrainableTokenIndices
{
    /// <summary>The list form (null for the dict form): rows of the input embedding.</summary>
    public IReadOnlyList<long>? List { get; }

    /// <summary>The dict form (null for the list form): module name → rows.</summary>
    public IReadOnlyDictionary<string, IReadOnlyList<long>>? PerModule { get; }

    public TrainableTokenIndices(IEnumerable<long> indices) => List = indices.ToList();

    public TrainableTokenIndices(IReadOnlyDictionary<string, IReadOnlyList<long>> perModule) =>
        PerModule = perModule.ToDictionary(kv => kv.Key, kv => (IReadOnlyList<long>)kv.Value.ToList());

    public static implicit operator TrainableTokenIndices(long[] indices) => new(indices);
    public static implicit operator TrainableTokenIndices(int[] indices) => new(indices.Select(i => (long)i));
    public static implicit operator TrainableTokenIndices(List<int> indices) => new(indices.Select(i => (long)i));

    public static implicit operator TrainableTokenIndices(Dictionary<string, int[]> perModule) =>
        new(perModule.ToDictionary(kv => kv.Key, kv => (IReadOnlyList<long>)kv.Value.Select(i => (long)i).ToList()));

    /// <summary>Module name (null: the input embedding) and rows, in the given order.</summary>
    public IEnumerable<(string? module, IReadOnlyList<long> indices)> Entries =>
        PerModule is { } map ? map.Select(kv => ((string?)kv.Key, kv.Value)) : [(null, List!)];

    public override string ToString() => JsonSerializer.Serialize(this);
}

public sealed class TrainableTokenIndicesConverter : JsonConverter<TrainableTokenIndices>
{
    public override TrainableTokenIndices? Read(ref Utf8JsonReader reader, Type typeToConvert, JsonSerializerOptions options)
    {
        switch (reader.TokenType)
        {
            case JsonTokenType.Null:
                return null;
            case JsonTokenType.StartArray:
                return new TrainableTokenIndices(ReadList(ref reader));
            case JsonTokenType.StartObject:
                var map = new Dictionary<string, IReadOnlyList<long>>();
                while (reader.Read() && reader.TokenType != JsonTokenType.EndObject)
                {
                    var key = reader.GetString()!;
                    reader.Read();
                    if (reader.TokenType != JsonTokenType.StartArray) throw new JsonException($"trainable_token_indices['{key}'] must be a list of token ids");
                    map[key] = ReadList(ref reader);
                }
                return new TrainableTokenIndices(map);
            default:
                throw new JsonException("trainable_token_indices must be a list of token ids or an object mapping module names to such lists");
        }
    }

    private static List<long> ReadList(ref Utf8JsonReader reader)
    {
        var list = new List<long>();
        while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
            list.Add(reader.TokenType == JsonTokenType.Number ? reader.GetInt64() : throw new JsonException("token ids must be integers"));
        return list;
    }

    public override void Write(Utf8JsonWriter writer, TrainableTokenIndices value, JsonSerializerOptions options)
    {
        if (value.List is { } list)
        {
            WriteList(writer, list);
            return;
        }
        writer.WriteStartObject();
        foreach (var (key, indices) in value.PerModule!)
        {
            writer.WritePropertyName(key);
            WriteList(writer, indices);
        }
        writer.WriteEndObject();
    }

    private static void WriteList(Utf8JsonWriter writer, IReadOnlyList<long> list)
    {
        writer.WriteStartArray();
        foreach (var i in list) writer.WriteNumberValue(i);
        writer.WriteEndArray();
    }
}
