using System.Text.Encodings.Web;
using System.Text.Json;

namespace LoRAHub.Safetensors;

/// <summary>
/// Reads and writes <c>model.safetensors.index.json</c>:
/// {"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file name}}.
/// </summary>
internal static class ShardIndex
{
    /// <summary>The weight map in the order the index lists it, validated: string shard names that are plain file names.</summary>
    public static List<KeyValuePair<string, string>> Read(string indexPath)
    {
        const string Fix = "re-download the checkpoint or re-save it";
        JsonDocument document;
        try
        {
            // Parsing from a stream also accepts a UTF-8 byte-order mark, which some editors add.
            using var stream = File.OpenRead(indexPath);
            document = JsonDocument.Parse(stream);
        }
        catch (JsonException e)
        {
            throw new SafetensorsFormatException(indexPath, null, $"the shard index is not valid JSON ({e.Message}); {Fix}", e);
        }

        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("weight_map", out var weightMap))
                throw new SafetensorsFormatException(indexPath, null, $"the shard index has no \"weight_map\" object; {Fix}");
            if (weightMap.ValueKind != JsonValueKind.Object)
                throw new SafetensorsFormatException(indexPath, null, $"\"weight_map\" is not an object of tensor name -> shard file; {Fix}");

            var map = new List<KeyValuePair<string, string>>();
            var seen = new HashSet<string>(StringComparer.Ordinal);
            foreach (var entry in weightMap.EnumerateObject())
            {
                if (!seen.Add(entry.Name))
                    throw new SafetensorsFormatException(indexPath, entry.Name, $"the tensor is listed more than once in \"weight_map\"; {Fix}");
                var shard = entry.Value.ValueKind == JsonValueKind.String ? entry.Value.GetString()! : null;
                // Only a plain file name in the checkpoint folder: an index must not make us open files elsewhere.
                if (string.IsNullOrEmpty(shard) || shard is "." or ".." || shard != Path.GetFileName(shard)
                    || shard.Contains('/') || shard.Contains('\\'))
                    throw new SafetensorsFormatException(indexPath, entry.Name,
                        $"the shard {entry.Value.GetRawText()} is not the name of a file in the checkpoint folder; {Fix}");
                map.Add(KeyValuePair.Create(entry.Name, shard));
            }
            return map;
        }
    }

    /// <summary>Writes the index as transformers does: two-space indent, keys sorted, trailing newline.</summary>
    public static void Write(string indexPath, IEnumerable<KeyValuePair<string, string>> weightMap, long totalSize)
    {
        AtomicFile.Write(indexPath, stream =>
        {
            using (var writer = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
            {
                writer.WriteStartObject();
                writer.WriteStartObject("metadata");
                writer.WriteNumber("total_size", totalSize);
                writer.WriteEndObject();
                writer.WriteStartObject("weight_map");
                foreach (var (name, shard) in weightMap.OrderBy(kv => kv.Key, StringComparer.Ordinal))
                    writer.WriteString(name, shard);
                writer.WriteEndObject();
                writer.WriteEndObject();
            }
            stream.WriteByte((byte)'\n');
        });
    }
}
