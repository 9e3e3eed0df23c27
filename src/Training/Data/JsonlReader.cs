using System.Text.Json;

namespace LoRAHub.Training.Data;

/// <summary>
/// Reads JSON Lines: one JSON object per non-empty line, each with its line number. A malformed line comes back
/// as an error rather than an exception, so a caller that skips bad records can go on reading.
/// </summary>
public static class JsonlReader
{
    public readonly record struct Line(int Number, JsonElement Record, string? Error);

    public static IEnumerable<Line> Read(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"data file not found: {path}", path);
        var number = 0;
        foreach (var text in File.ReadLines(path))
        {
            number++;
            if (string.IsNullOrWhiteSpace(text)) continue;
            yield return Parse(number, text);
        }
    }

    private static Line Parse(int number, string text)
    {
        try
        {
            using var doc = JsonDocument.Parse(text);
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
