using System.Buffers;
using System.Text.Encodings.Web;
using System.Text.Json;

namespace LoRAHub.Safetensors;

/// <summary>Serializes a header: optional __metadata__ first, then the tensors in the given order, padded to 8 bytes.</summary>
internal static class HeaderBuilder
{
    // The relaxed encoder writes names such as "a+b" or non-ASCII text as-is instead of \u escapes; the JSON is
    // equivalent either way, this just keeps headers readable and identical to what Python and Rust writers produce.
    private static readonly JsonWriterOptions Options = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    public static byte[] Build(IReadOnlyList<TensorInfo> tensors, IReadOnlyDictionary<string, string>? metadata)
    {
        var json = new ArrayBufferWriter<byte>();
        using (var writer = new Utf8JsonWriter(json, Options))
        {
            writer.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                writer.WriteStartObject(HeaderParser.MetadataKey);
                foreach (var (key, value) in metadata) writer.WriteString(key, value);
                writer.WriteEndObject();
            }
            foreach (var tensor in tensors)
            {
                writer.WriteStartObject(tensor.Name);
                writer.WriteString("dtype", SafetensorsDTypes.ToCode(tensor.DType));
                writer.WriteStartArray("shape");
                foreach (var dim in tensor.Shape) writer.WriteNumberValue(dim);
                writer.WriteEndArray();
                writer.WriteStartArray("data_offsets");
                writer.WriteNumberValue(tensor.Begin);
                writer.WriteNumberValue(tensor.End);
                writer.WriteEndArray();
                writer.WriteEndObject();
            }
            writer.WriteEndObject();
        }

        // Padding with spaces (valid trailing JSON whitespace) to a multiple of 8 puts the data section on an 8-byte
        // boundary of the mapped file, which the spec requires.
        var padded = (json.WrittenCount + 7) / 8 * 8;
        var header = new byte[padded];
        json.WrittenSpan.CopyTo(header);
        header.AsSpan(json.WrittenCount).Fill((byte)' ');
        return header;
    }
}
