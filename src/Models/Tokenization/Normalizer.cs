using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace LoRAHub.Models.Tokenization;

/// <summary>tokenizer.json's "normalizer": text rewrites applied before pre-tokenization.</summary>
public static class Normalizer
{
    /// <summary>Builds the normalizer function; null JSON means identity.</summary>
    public static Func<string, string> FromJson(JsonElement? json)
    {
        if (JsonFields.OptionalObject(json, "normalizer") is not { } n) return s => s;
        var type = n.RequiredString("type");
        switch (type)
        {
            case "Sequence":
                var steps = n.RequiredArray("normalizers").Select(e => FromJson(e)).ToArray();
                return s => steps.Aggregate(s, (acc, f) => f(acc));
            case "Prepend":
                // SentencePiece's dummy prefix ("▁"); tokenizers leaves empty strings alone.
                var prefix = n.RequiredString("prepend");
                return s => s.Length == 0 ? s : prefix + s;
            case "Replace":
                var (pattern, isRegex) = Pattern(n.Required("pattern"));
                var content = n.RequiredString("content");
                if (!isRegex) return s => s.Replace(pattern, content, StringComparison.Ordinal);
                var regex = new Regex(pattern, RegexOptions.CultureInvariant);
                return s => regex.Replace(s, content);
            case "NFC": return s => s.Normalize(NormalizationForm.FormC);
            case "NFD": return s => s.Normalize(NormalizationForm.FormD);
            case "NFKC": return s => s.Normalize(NormalizationForm.FormKC);
            case "NFKD": return s => s.Normalize(NormalizationForm.FormKD);
            case "Lowercase": return s => s.ToLowerInvariant();
            case "Strip":
                bool left = n.OptionalBool("strip_left"), right = n.OptionalBool("strip_right");
                return s => left && right ? s.Trim() : left ? s.TrimStart() : right ? s.TrimEnd() : s;
            default:
                throw new NotSupportedException($"normalizer '{type}' is not supported (Sequence, Prepend, Replace, NFC/NFD/NFKC/NFKD, Lowercase, Strip)");
        }
    }

    /// <summary>A {"String": s} or {"Regex": r} pattern.</summary>
    internal static (string pattern, bool isRegex) Pattern(JsonElement p) =>
        p.ValueKind == JsonValueKind.Object && p.TryGetProperty("Regex", out var r) ? (r.AsString("Regex"), true) : (p.RequiredString("String"), false);
}
