using System.Text;
using System.Text.Json;

namespace LoRAHub.Models.Tokenization;

/// <summary>tokenizer.json's "decoder": turns the token strings back into text, step by step as tokenizers does.</summary>
public static class Decoder
{
    public delegate List<string> Step(List<string> tokens);

    private static readonly UTF8Encoding StrictUtf8 = new(false, throwOnInvalidBytes: true);

    /// <summary>Builds the decoder; without one, tokens are joined by spaces (tokenizers' default).</summary>
    public static Func<List<string>, string> FromJson(JsonElement? json)
    {
        if (JsonFields.OptionalObject(json, "decoder") is not { } d) return tokens => string.Join(" ", tokens);
        var step = BuildStep(d);
        return tokens => string.Concat(step(tokens));
    }

    private static Step BuildStep(JsonElement d)
    {
        var type = d.RequiredString("type");
        switch (type)
        {
            case "Sequence":
                var steps = d.RequiredArray("decoders").Select(BuildStep).ToArray();
                return tokens => steps.Aggregate(tokens, (acc, f) => f(acc));
            case "ByteLevel":
                return tokens => [Encoding.UTF8.GetString(tokens.SelectMany(ByteLevel.DecodeToken).ToArray())];
            case "Replace":
                var (pattern, isRegex) = Normalizer.Pattern(d.Required("pattern"));
                if (isRegex) throw new NotSupportedException("Replace decoder with a regex is not supported");
                var content = d.RequiredString("content");
                return tokens => tokens.Select(t => t.Replace(pattern, content, StringComparison.Ordinal)).ToList();
            case "ByteFallback":
                return ByteFallback;
            case "Fuse":
                return tokens => [string.Concat(tokens)];
            case "Strip":
                var stripped = d.RequiredString("content");
                if (stripped.Length != 1) throw new InvalidDataException($"Strip decoder 'content' must be one character, not '{stripped}'");
                var c = stripped[0];
                int start = d.Required("start").AsInt("start"), stop = d.Required("stop").AsInt("stop");
                return tokens => tokens.Select(t => Strip(t, c, start, stop)).ToList();
            case "Metaspace":
                var replacement = d.OptionalString("replacement") ?? "▁";
                var scheme = d.OptionalString("prepend_scheme") ?? (d.OptionalBool("add_prefix_space", true) ? "always" : "never");
                return tokens => tokens.Select((t, i) =>
                {
                    var s = t.Replace(replacement, " ", StringComparison.Ordinal);
                    return i == 0 && scheme != "never" && s.StartsWith(' ') ? s[1..] : s;
                }).ToList();
            default:
                throw new NotSupportedException($"decoder '{type}' is not supported (ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence)");
        }
    }

    /// <summary>Runs of &lt;0xNN&gt; tokens become their UTF-8 text; invalid bytes become U+FFFD, one per byte.</summary>
    private static List<string> ByteFallback(List<string> tokens)
    {
        var result = new List<string>();
        var pending = new List<byte>();
        void Flush()
        {
            if (pending.Count == 0) return;
            try { result.Add(StrictUtf8.GetString(pending.ToArray())); }
            catch (DecoderFallbackException) { result.Add(new string('\uFFFD', pending.Count)); }
            pending.Clear();
        }
        foreach (var t in tokens)
        {
            if (t.Length == 6 && t.StartsWith("<0x", StringComparison.Ordinal) && t[5] == '>' &&
                byte.TryParse(t.AsSpan(3, 2), System.Globalization.NumberStyles.HexNumber, null, out var b))
            {
                pending.Add(b);
                continue;
            }
            Flush();
            result.Add(t);
        }
        Flush();
        return result;
    }

    private static string Strip(string t, char c, int start, int stop)
    {
        int from = 0, to = t.Length;
        while (from < to && from < start && t[from] == c) from++;
        while (to > from && t.Length - to < stop && t[to - 1] == c) to--;
        return t[from..to];
    }
}
