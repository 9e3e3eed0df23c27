using System.Text.Json;
using System.Text.Unicode;

namespace LoRAHub.Safetensors;

/// <summary>
/// Parses and fully validates the JSON header. After this succeeds every tensor's byte range lies inside the data
/// section, matches its dtype and shape, and the ranges tile the data section exactly, so readers may index the
/// mapped memory without further checks.
/// </summary>
internal static class HeaderParser
{
    internal const string MetadataKey = "__metadata__";

    /// <summary>The reference implementation refuses headers above 100 MB; so do we, before allocating anything.</summary>
    internal const long MaxHeaderBytes = 100_000_000;

    internal const string Fix = "re-download or re-save it";

    /// <param name="path">The file, for error messages.</param>
    /// <param name="header">The header bytes, padding included.</param>
    /// <param name="dataLength">The size of the data section (file length - 8 - header length).</param>
    public static (List<TensorInfo> Tensors, Dictionary<string, string> Metadata) Parse(string path, ReadOnlyMemory<byte> header, long dataLength)
    {
        // The spec requires the first header byte to be '{'; checking it first gives a clear message for files that are
        // not safetensors at all (HTML error pages, pickles, git-lfs pointers).
        if (header.IsEmpty)
            throw new SafetensorsFormatException(path, null, $"the header is empty (header length 0); a safetensors header is a JSON object; {Fix}");
        if (header.Span[0] != (byte)'{')
            throw new SafetensorsFormatException(path, null,
                $"the header starts with byte 0x{header.Span[0]:X2}, not '{{'; this is not a safetensors file or it is corrupt; {Fix}");
        if (!Utf8.IsValid(header.Span))
            throw new SafetensorsFormatException(path, null, $"the header is not valid UTF-8; the file is corrupt; {Fix}");

        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(header);
        }
        catch (JsonException e)
        {
            throw new SafetensorsFormatException(path, null, $"the header is not valid JSON ({e.Message}); the file is corrupt; {Fix}", e);
        }

        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new SafetensorsFormatException(path, null, $"the header is a JSON {Kind(root)}, not an object; {Fix}");

            var tensors = new List<TensorInfo>();
            var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            var seen = new HashSet<string>(StringComparer.Ordinal);
            foreach (var property in root.EnumerateObject())
            {
                // JSON parsers disagree on which duplicate wins, so a duplicate could show one tensor to an auditor and
                // another to a loader; the spec forbids them.
                if (!seen.Add(property.Name))
                    throw new SafetensorsFormatException(path, property.Name == MetadataKey ? null : property.Name,
                        $"the key '{property.Name}' appears more than once in the header; duplicate keys are not allowed; {Fix}");
                if (property.Name == MetadataKey)
                    ReadMetadata(path, property.Value, metadata);
                else
                    tensors.Add(ReadTensor(path, property.Name, property.Value, dataLength));
            }
            CheckTiling(path, tensors, dataLength);
            return (tensors, metadata);
        }
    }

    private static void ReadMetadata(string path, JsonElement element, Dictionary<string, string> metadata)
    {
        if (element.ValueKind != JsonValueKind.Object)
            throw new SafetensorsFormatException(path, null, $"'{MetadataKey}' is a JSON {Kind(element)}, but it must be an object of strings; {Fix}");
        foreach (var entry in element.EnumerateObject())
        {
            if (entry.Value.ValueKind != JsonValueKind.String)
                throw new SafetensorsFormatException(path, null,
                    $"'{MetadataKey}' value '{entry.Name}' is a JSON {Kind(entry.Value)}, but metadata values must be strings; {Fix}");
            if (!metadata.TryAdd(entry.Name, entry.Value.GetString()!))
                throw new SafetensorsFormatException(path, null, $"'{MetadataKey}' has the key '{entry.Name}' more than once; {Fix}");
        }
    }

    private static TensorInfo ReadTensor(string path, string name, JsonElement entry, long dataLength)
    {
        SafetensorsFormatException Bad(string problem) => new(path, name, $"{problem}; {Fix}");

        if (entry.ValueKind != JsonValueKind.Object)
            throw Bad($"the entry is a JSON {Kind(entry)}, not an object with 'dtype', 'shape' and 'data_offsets'");

        JsonElement? dtypeField = null, shapeField = null, offsetsField = null;
        foreach (var field in entry.EnumerateObject())
        {
            // Other fields are ignored, as the reference implementation does; a repeated field is as ambiguous as a
            // repeated tensor name.
            JsonElement Once(JsonElement? earlier) => earlier is null ? field.Value : throw Bad($"the field '{field.Name}' appears more than once");
            switch (field.Name)
            {
                case "dtype": dtypeField = Once(dtypeField); break;
                case "shape": shapeField = Once(shapeField); break;
                case "data_offsets": offsetsField = Once(offsetsField); break;
            }
        }

        if (dtypeField is not { } dtypeElement) throw Bad("missing 'dtype'");
        if (dtypeElement.ValueKind != JsonValueKind.String)
            throw Bad($"'dtype' is a JSON {Kind(dtypeElement)}, but it must be a string such as \"F32\"");
        var code = dtypeElement.GetString()!;
        if (!SafetensorsDTypes.TryParse(code, out var dtype)) throw Bad(SafetensorsDTypes.DescribeUnknown(code));

        if (shapeField is not { } shapeElement) throw Bad("missing 'shape'");
        if (shapeElement.ValueKind != JsonValueKind.Array)
            throw Bad($"'shape' is a JSON {Kind(shapeElement)}, but it must be an array of non-negative integers");
        var shape = new long[shapeElement.GetArrayLength()];
        var elements = 1L;
        var index = 0;
        foreach (var dim in shapeElement.EnumerateArray())
        {
            if (!TryNonNegative(dim, out var value))
                throw Bad($"shape {Show(shapeElement)} has an invalid dimension {Show(dim)} at index {index}; dimensions must be non-negative integers");
            shape[index++] = value;
            // Like the reference implementation, any overflowing partial product is an error, even if a later
            // dimension is 0; it also keeps TensorInfo.ElementCount from overflowing.
            if (!TryMultiply(elements, value, out elements))
                throw Bad($"the element count of shape {Show(shapeElement)} overflows a 64-bit integer");
        }

        if (offsetsField is not { } offsetsElement) throw Bad("missing 'data_offsets'");
        if (offsetsElement.ValueKind != JsonValueKind.Array || offsetsElement.GetArrayLength() != 2
            || !TryNonNegative(offsetsElement[0], out var begin) || !TryNonNegative(offsetsElement[1], out var end))
            throw Bad($"invalid data_offsets {Show(offsetsElement)}; expected [begin, end] with two non-negative integers");
        if (begin > end)
            throw Bad($"invalid data_offsets [{begin}, {end}]; begin is after end");

        var length = end - begin;
        if (!TryMultiply(elements, SafetensorsDTypes.ElementSize(dtype), out var needed))
            throw Bad($"the byte size of shape {Show(shapeElement)} of {code} overflows a 64-bit integer");
        if (needed != length)
            throw Bad($"shape {Show(shapeElement)} of {code} needs {needed} bytes, but data_offsets [{begin}, {end}] hold {length}; the header is inconsistent");
        if (end > dataLength)
            throw Bad($"the file is truncated: data_offsets end at byte {end} of the data section, but the file has only {dataLength} bytes after the header");

        return new TensorInfo(name, dtype, shape, begin, end);
    }

    /// <summary>Checks that the byte ranges, in offset order, follow each other with no overlap and no hole.</summary>
    private static void CheckTiling(string path, List<TensorInfo> tensors, long dataLength)
    {
        // Sorting by (Begin, End) puts empty tensors before a tensor starting at the same byte, where they are legal.
        var ordered = tensors.OrderBy(t => t.Begin).ThenBy(t => t.End);
        long covered = 0;
        TensorInfo? previous = null;
        foreach (var tensor in ordered)
        {
            if (tensor.Begin < covered)
                throw new SafetensorsFormatException(path, tensor.Name,
                    $"the byte range {tensor.Begin}..{tensor.End} overlaps tensor '{previous!.Name}' (bytes {previous.Begin}..{previous.End}); tensors must not share bytes; {Fix}");
            if (tensor.Begin > covered)
                throw new SafetensorsFormatException(path, tensor.Name,
                    $"there is a hole of {Bytes(tensor.Begin - covered)} (data bytes {covered}..{tensor.Begin}) before this tensor"
                    + (previous is null ? ", at the start of the data section" : $", after tensor '{previous.Name}'")
                    + $"; the spec requires the tensors to cover the data section without gaps; {Fix}");
            covered = tensor.End;
            previous = tensor;
        }
        if (covered < dataLength)
            throw new SafetensorsFormatException(path, null,
                $"there is a hole of {Bytes(dataLength - covered)} at the end of the data section (bytes {covered}..{dataLength}"
                + (previous is null ? ", and the header lists no tensor" : $", after tensor '{previous.Name}'")
                + $"); the spec requires the tensors to cover the data section exactly, so the file has trailing bytes or its header lacks entries; {Fix}");
    }

    private static bool TryNonNegative(JsonElement element, out long value)
    {
        // TryGetInt64 rejects fractions, exponents and values beyond 64 bits; the kind check must come first because
        // TryGetInt64 throws on non-numbers.
        value = 0;
        return element.ValueKind == JsonValueKind.Number && element.TryGetInt64(out value) && value >= 0;
    }

    /// <summary>Multiplies two non-negative numbers, reporting overflow instead of wrapping.</summary>
    private static bool TryMultiply(long a, long b, out long product)
    {
        var fits = b == 0 || a <= long.MaxValue / b;
        product = fits ? a * b : 0;
        return fits;
    }

    private static string Bytes(long count) => count == 1 ? "1 byte" : $"{count} bytes";

    private static string Kind(JsonElement element) => element.ValueKind switch
    {
        JsonValueKind.Object => "object",
        JsonValueKind.Array => "array",
        JsonValueKind.String => "string",
        JsonValueKind.Number => "number",
        JsonValueKind.True or JsonValueKind.False => "boolean",
        _ => "null",
    };

    /// <summary>The element's JSON text for a message, cut short so a hostile header cannot produce a huge message.</summary>
    private static string Show(JsonElement element)
    {
        var text = element.GetRawText();
        return text.Length <= 80 ? text : text[..77] + "...";
    }
}
