using System.Text.Json;
using System.Text.RegularExpressions;

namespace LoRAHub.Models.Tokenization;

/// <summary>
/// tokenizer.json's "pre_tokenizer": splits normalized text into words that BPE encodes independently.
/// Each step maps the list of pieces to a new list.
/// </summary>
public static class PreTokenizer
{
    /// <summary>GPT-2's word pattern (also the ByteLevel default when use_regex is true).</summary>
    public const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    /// <summary>Llama 3's pattern (numbers in groups of three, case-insensitive contractions).</summary>
    public const string Llama3Pattern = @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    private static readonly Regex Gpt2Regex = new(Gpt2Pattern, RegexOptions.Compiled | RegexOptions.CultureInvariant);

    /// <summary>A step gets the pieces and whether they come from the start of the input (for "first" prefix schemes).</summary>
    public delegate List<string> Step(List<string> pieces, bool atStart);

    public static Step FromJson(JsonElement? json)
    {
        if (JsonFields.OptionalObject(json, "pre_tokenizer") is not { } p) return (pieces, _) => pieces;
        var type = p.RequiredString("type");
        bool Flag(string name, bool fallback) => p.OptionalBool(name, fallback);
        switch (type)
        {
            case "Sequence":
                var steps = p.RequiredArray("pretokenizers").Select(e => FromJson(e)).ToArray();
                return (pieces, atStart) => steps.Aggregate(pieces, (acc, f) => f(acc, atStart));
            case "ByteLevel":
                return ByteLevelStep(Flag("add_prefix_space", true), Flag("use_regex", true));
            case "Split":
                var (pattern, isRegex) = Normalizer.Pattern(p.Required("pattern"));
                var behavior = p.RequiredString("behavior");
                if (behavior is not ("Isolated" or "Removed" or "MergedWithPrevious" or "MergedWithNext" or "Contiguous"))
                    throw new NotSupportedException($"Split behavior '{behavior}' is not supported (Isolated, Removed, MergedWithPrevious, MergedWithNext, Contiguous)");
                if (Flag("invert", false)) throw new NotSupportedException("Split with invert=true is not supported");
                var regex = new Regex(isRegex ? pattern : Regex.Escape(pattern), RegexOptions.Compiled | RegexOptions.CultureInvariant);
                return (pieces, _) => pieces.SelectMany(s => Split(s, regex, behavior)).ToList();
            case "Metaspace":
                var replacement = p.OptionalString("replacement") ?? "▁";
                // Newer files say prepend_scheme; older ones add_prefix_space (true means "always").
                var scheme = p.OptionalString("prepend_scheme") ?? (Flag("add_prefix_space", true) ? "always" : "never");
                return MetaspaceStep(replacement, scheme, Flag("split", true));
            case "Digits":
                var digits = new Regex(Flag("individual_digits", false) ? @"\p{N}" : @"\p{N}+", RegexOptions.Compiled);
                return (pieces, _) => pieces.SelectMany(s => Split(s, digits, "Isolated")).ToList();
            default:
                throw new NotSupportedException($"pre_tokenizer '{type}' is not supported (ByteLevel, Split, Metaspace, Digits, Sequence)");
        }
    }

    private static Step ByteLevelStep(bool addPrefixSpace, bool useRegex) => (pieces, _) =>
    {
        var result = new List<string>();
        foreach (var piece in pieces)
        {
            var s = addPrefixSpace && piece.Length > 0 && piece[0] != ' ' ? " " + piece : piece;
            if (useRegex) result.AddRange(Gpt2Regex.Matches(s).Select(m => ByteLevel.Encode(m.Value)));
            else result.Add(ByteLevel.Encode(s));
        }
        return result;
    };

    private static Step MetaspaceStep(string replacement, string scheme, bool split) => (pieces, atStart) =>
    {
        var result = new List<string>();
        for (var i = 0; i < pieces.Count; i++)
        {
            var s = pieces[i].Replace(" ", replacement, StringComparison.Ordinal);
            var prepend = scheme == "always" || (scheme == "first" && atStart && i == 0);
            if (prepend && !s.StartsWith(replacement, StringComparison.Ordinal)) s = replacement + s;
            if (!split) result.Add(s);
            else result.AddRange(Split(s, new Regex(Regex.Escape(replacement)), "MergedWithNext"));
        }
        return result;
    };

    /// <summary>tokenizers' split behaviours: matches kept alone (Isolated), dropped, or glued to a neighbour.</summary>
    internal static IEnumerable<string> Split(string s, Regex regex, string behavior)
    {
        var parts = new List<(string text, bool match)>();
        var at = 0;
        foreach (Match m in regex.Matches(s))
        {
            if (m.Length == 0) continue;
            if (m.Index > at) parts.Add((s[at..m.Index], false));
            parts.Add((m.Value, true));
            at = m.Index + m.Length;
        }
        if (at < s.Length) parts.Add((s[at..], false));

        switch (behavior)
        {
            case "Isolated": return parts.Select(p => p.text);
            case "Removed": return parts.Where(p => !p.match).Select(p => p.text);
            case "MergedWithPrevious":
            {
                var result = new List<string>();
                foreach (var (text, match) in parts)
                    if (match && result.Count > 0) result[^1] += text; else result.Add(text);
                return result;
            }
            case "MergedWithNext":
            {
                var result = new List<string>();
                var pending = "";
                foreach (var (text, match) in parts)
                {
                    if (match) { if (pending.Length > 0) result.Add(pending); pending = text; }
                    else { result.Add(pending + text); pending = ""; }
                }
                if (pending.Length > 0) result.Add(pending);
                return result;
            }
            case "Contiguous":
            {
                var result = new List<(string text, bool match)>();
                foreach (var p in parts)
                    if (result.Count > 0 && result[^1].match == p.match) result[^1] = (result[^1].text + p.text, p.match); else result.Add(p);
                return result.Select(p => p.text);
            }
            default:
                throw new NotSupportedException($"Split behavior '{behavior}' is not supported");
        }
    }
}
