using System.Buffers;
using System.Text;
using System.Text.Json;
using System.Text.Unicode;

namespace LoRAHub.Training.Data;

/// <summary>
/// Reads JSON Lines: one JSON object per non-empty line, each with its line number. A malformed line (invalid JSON,
/// invalid UTF-8, longer than <see cref="MaxLineBytes"/>) comes back as an error rather than an exception, so a caller
/// that skips bad records can go on reading. Lines are read as bytes: invalid UTF-8 is reported, not silently replaced,
/// and a huge line is refused without being held in memory.
/// </summary>
public static class JsonlReader
{
    /// <summary>The longest line accepted (64 MiB): far beyond any training record, short of exhausting memory.</summary>
    public static int MaxLineBytes { get; set; } = 64 << 20;

    public readonly record struct Line(int Number, JsonElement Record, string? Error);

    public static IEnumerable<Line> Read(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"data file not found: {path}", path);
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1 << 16);
        var buffer = new ArrayBufferWriter<byte>();
        var number = 0;
        var tooLong = false;
        long lineBytes = 0;
        var chunk = new byte[1 << 16];
        int read;
        while ((read = stream.Read(chunk, 0, chunk.Length)) > 0)
        {
            var position = 0;
            while (position < read)
            {
                var newline = Array.IndexOf(chunk, (byte)'\n', position, read - position);
                var end = newline < 0 ? read : newline;
                lineBytes += end - position;
                if (lineBytes > MaxLineBytes) tooLong = true;
                else buffer.Write(chunk.AsSpan(position, end - position));
                if (newline < 0) break;
                number++;
                if (Finish(number, buffer, tooLong, lineBytes) is { } line) yield return line;
                buffer.Clear();
                tooLong = false;
                lineBytes = 0;
                position = newline + 1;
            }
        }
        if (lineBytes > 0 || buffer.WrittenCount > 0)
        {
            number++;
            if (Finish(number, buffer, tooLong, lineBytes) is { } last) yield return last;
        }
    }

    private static Line? Finish(int number, ArrayBufferWriter<byte> buffer, bool tooLong, long lineBytes)
    {
        if (tooLong)
            return new Line(number, default, $"the line has {lineBytes} bytes, more than the {MaxLineBytes}-byte limit (JsonlReader.MaxLineBytes); split the record or raise the limit");
        var bytes = buffer.WrittenSpan;
        if (number == 1 && bytes.StartsWith(Encoding.UTF8.Preamble)) bytes = bytes[3..];
        if (!bytes.IsEmpty && bytes[^1] == (byte)'\r') bytes = bytes[..^1];
        if (bytes.Trim(" \t\r"u8).IsEmpty) return null;
        if (!Utf8.IsValid(bytes))
        {
            var at = FirstInvalidUtf8(bytes);
            return new Line(number, default, $"the line is not valid UTF-8 (bad byte 0x{bytes[at]:X2} at byte {at + 1} of the line); save the file as UTF-8");
        }
        return Parse(number, bytes);
    }

    private static int FirstInvalidUtf8(ReadOnlySpan<byte> bytes)
    {
        var at = 0;
        while (at < bytes.Length && Rune.DecodeFromUtf8(bytes[at..], out _, out var used) == OperationStatus.Done) at += used;
        return Math.Min(at, bytes.Length - 1);
    }

    private static Line Parse(int number, ReadOnlySpan<byte> bytes)
    {
        try
        {
            var reader = new Utf8JsonReader(bytes, new JsonReaderOptions { MaxDepth = 64 });
            using var doc = JsonDocument.ParseValue(ref reader);
            // ParseValue stops after the first value: anything but whitespace after it is a second record or garbage.
            if (!bytes[(int)reader.BytesConsumed..].Trim(" \t\r"u8).IsEmpty)
                return new Line(number, default, $"unexpected text after the JSON object at byte {reader.BytesConsumed + 1}; JSON Lines holds one object per line");
            return doc.RootElement.ValueKind == JsonValueKind.Object
                ? new Line(number, doc.RootElement.Clone(), null)
                : new Line(number, default, $"expected a JSON object, found {doc.RootElement.ValueKind}");
        }
        catch (JsonException e)
        {
            return new Line(number, default, $"invalid JSON ({e.Message})");
        }
    }
}
