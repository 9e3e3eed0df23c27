using System.Text;

namespace LoRAHub.Reliability.Tests.Corpus;

/// <summary>JSONL training data: invalid UTF-8, broken JSON, missing and mistyped fields per format, huge lines.</summary>
public static class DataCases
{
    private const string File = "train.jsonl";

    /// <summary>The line limit the huge-line cases run under (the default, 64 MiB, would make the corpus slow).</summary>
    public const int LineLimit = 1 << 20;

    private static readonly byte[] Good = Encoding.UTF8.GetBytes("{\"text\": \"abc def\"}\n");

    private static BadInput Case(string name, Func<byte[]> badLine, DataFormat format = DataFormat.Auto, int goodBefore = 2) =>
        new("jsonl", name, "H6", folder =>
        {
            var path = Path.Combine(folder, File);
            using var stream = System.IO.File.Create(path);
            for (var i = 0; i < goodBefore; i++) stream.Write(Good);
            stream.Write(badLine());
            stream.Write("\n"u8);
            stream.Write(Good);
            return path;
        }, folder => TextDataset.LoadJsonl(Path.Combine(folder, File), new CharTokenizer(), format));

    private static byte[] U(string s) => Encoding.UTF8.GetBytes(s);

    public static IEnumerable<BadInput> All()
    {
        // Invalid UTF-8 inside a string value.
        foreach (var (label, bytes) in new (string, byte[])[]
        {
            ("lone continuation byte", [0x80]), ("truncated 2-byte sequence", [0xC3]), ("truncated 3-byte sequence", [0xE2, 0x82]),
            ("truncated 4-byte sequence", [0xF0, 0x9F, 0x98]), ("overlong slash", [0xC0, 0xAF]), ("overlong NUL", [0xE0, 0x80, 0x80]),
            ("UTF-16 surrogate", [0xED, 0xA0, 0x80]), ("beyond U+10FFFF", [0xF4, 0x90, 0x80, 0x80]), ("0xFF byte", [0xFF]), ("0xFE byte", [0xFE]),
            ("Latin-1 é", [0xE9]), ("Windows-1252 quotes", [0x93, 0x94]),
        })
        {
            yield return Case($"invalid UTF-8 in a value: {label}", () => [.. U("{\"text\": \"ab"), .. bytes, .. U("c\"}")]);
            yield return Case($"invalid UTF-8 in a key: {label}", () => [.. U("{\"te"), .. bytes, .. U("xt\": \"abc\"}")]);
        }
        yield return Case("UTF-16 encoded line", () => Encoding.Unicode.GetBytes("{\"text\": \"abc\"}"));

        // Broken JSON.
        foreach (var (label, line) in new[]
        {
            ("unterminated object", "{\"text\": \"abc\""), ("unterminated string", "{\"text\": \"abc}"), ("trailing comma", "{\"text\": \"abc\",}"),
            ("single quotes", "{'text': 'abc'}"), ("bare word", "text: abc"), ("two objects on a line", "{\"text\": \"a\"} {\"text\": \"b\"}"),
            ("an array", "[\"abc\"]"), ("a string", "\"abc\""), ("a number", "42"), ("null", "null"), ("deep nesting", new string('[', 10000) + new string(']', 10000)),
            ("deep object nesting", string.Concat(Enumerable.Repeat("{\"a\":", 3000)) + "1" + new string('}', 3000)), ("NaN literal", "{\"text\": NaN}"),
            ("control character in string", "{\"text\": \"a\u0001b\"}"), ("comment", "{\"text\": \"abc\"} // note"),
        })
            yield return Case($"JSON: {label}", () => U(line));

        // Missing or mistyped fields, for each format.
        foreach (var (label, line, format) in new[]
        {
            ("no known field", "{\"content\": \"abc\"}", DataFormat.Auto), ("empty object", "{}", DataFormat.Auto),
            ("text is a number", "{\"text\": 5}", DataFormat.Auto), ("text is null", "{\"text\": null}", DataFormat.Auto),
            ("text is an array", "{\"text\": [\"a\"]}", DataFormat.Auto),
            ("text has characters the tokenizer lacks", "{\"text\": \"ABC\"}", DataFormat.Auto),
            ("instruction without output", "{\"instruction\": \"abc\"}", DataFormat.Auto), ("output is a number", "{\"instruction\": \"abc\", \"output\": 1}", DataFormat.Auto),
            ("prompt without completion", "{\"prompt\": \"abc\"}", DataFormat.Auto), ("completion is an object", "{\"prompt\": \"a\", \"completion\": {}}", DataFormat.Auto),
            ("messages is a string", "{\"messages\": \"hi\"}", DataFormat.Auto), ("messages is empty", "{\"messages\": []}", DataFormat.Auto),
            ("message is a string", "{\"messages\": [\"hi\"]}", DataFormat.Auto), ("message without role", "{\"messages\": [{\"content\": \"hi\"}]}", DataFormat.Auto),
            ("message without content", "{\"messages\": [{\"role\": \"user\"}]}", DataFormat.Auto),
            ("role is a number", "{\"messages\": [{\"role\": 1, \"content\": \"hi\"}]}", DataFormat.Auto),
            ("no assistant turn", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", DataFormat.Auto),
            ("empty role", "{\"messages\": [{\"role\": \"\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"ok\"}]}", DataFormat.Auto),
            ("text record read as Instruction", "{\"text\": \"abc\"}", DataFormat.Instruction), ("text record read as Chat", "{\"text\": \"abc\"}", DataFormat.Chat),
            ("chat record read as Text", "{\"messages\": [{\"role\": \"assistant\", \"content\": \"a\"}]}", DataFormat.Text),
            ("prompt record read as PromptCompletion without completion", "{\"prompt\": \"a\", \"text\": \"b\"}", DataFormat.PromptCompletion),
        })
            yield return Case($"field: {label} ({format})", () => U(line), format);

        // Huge lines: over the limit, with and without a newline after; a long valid line under it loads.
        yield return Case("line over the limit", () => [.. U("{\"text\": \""), .. Enumerable.Repeat((byte)'a', LineLimit + 10), .. U("\"}")]);
        yield return Case("line over the limit of spaces", () => Enumerable.Repeat((byte)' ', LineLimit + 1).Concat(U("{}")).ToArray());
        yield return Case("line over the limit, invalid UTF-8", () => Enumerable.Repeat((byte)0xFF, LineLimit + 1).ToArray());
        // The first line is the bad one (no good lines before), and a file of only bad lines.
        yield return Case("bad first line", () => U("{oops"), goodBefore: 0);
        yield return new BadInput("jsonl", "empty file", "H6", folder =>
        {
            var path = Path.Combine(folder, File);
            System.IO.File.WriteAllBytes(path, []);
            return path;
        }, folder => TextDataset.LoadJsonl(Path.Combine(folder, File), new CharTokenizer()));
        yield return new BadInput("jsonl", "only blank lines", "H6", folder =>
        {
            var path = Path.Combine(folder, File);
            System.IO.File.WriteAllText(path, "\n\n   \n\t\n");
            return path;
        }, folder => TextDataset.LoadJsonl(Path.Combine(folder, File), new CharTokenizer()));
        yield return new BadInput("jsonl", "a folder, not a file", "H6", folder =>
        {
            var path = Path.Combine(folder, File);
            Directory.CreateDirectory(path);
            return path;
        }, folder => TextDataset.LoadJsonl(Path.Combine(folder, File), new CharTokenizer()));
        yield return new BadInput("jsonl", "missing file", "H6", folder => Path.Combine(folder, File),
            folder => TextDataset.LoadJsonl(Path.Combine(folder, File), new CharTokenizer()));

        // Seeded random bytes in the middle of a record: fail with the line, or load.
        var random = new Random(17);
        for (var n = 0; n < 30; n++)
        {
            var at = random.Next(1, 16);
            var value = (byte)random.Next(256);
            yield return Case($"byte {at} set to 0x{value:X2}", () =>
            {
                var line = U("{\"text\": \"abc def\"}");
                line[at] = value;
                return line;
            }) with { MayLoad = true };
        }
    }
}

/// <summary>One token per character of a fixed alphabet (pad 0, eos 1); other characters are a FormatException.</summary>
public sealed class CharTokenizer(string alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 +=:\n#.") : ITokenizer
{
    public int[] Encode(string text, bool addSpecialTokens = true) =>
        text.Select(c => alphabet.IndexOf(c) is var i and >= 0 ? i + 2 : throw new FormatException($"character '{c}' is not in the alphabet")).ToArray();

    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens = true) => new(ids.Where(i => i >= 2).Select(i => alphabet[i - 2]).ToArray());
    public int? BosTokenId => null;
    public int? EosTokenId => 1;
    public int PadTokenId => 0;
    public int VocabSize => alphabet.Length + 2;

    public string ApplyChatTemplate(IReadOnlyList<(string Role, string Content)> messages, bool addGenerationPrompt) =>
        string.Concat(messages.Select(m => $"#{m.Role[0]}:{m.Content}\n")) + (addGenerationPrompt ? "#a:" : "");
}
