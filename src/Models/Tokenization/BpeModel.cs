using System.Collections.Concurrent;
using System.Text.Json;

namespace LoRAHub.Models.Tokenization;

/// <summary>
/// tokenizers' BPE model: a word is split into characters (or byte tokens with byte_fallback), then the adjacent
/// pair with the lowest merge rank is merged until no ranked pair is left.
/// </summary>
public sealed class BpeModel
{
    private readonly Dictionary<string, int> vocab;
    private readonly Dictionary<(string, string), int> ranks = new();
    private readonly ConcurrentDictionary<string, int[]> cache = new();

    public BpeModel(Dictionary<string, int> vocab, IEnumerable<(string, string)> merges, string? unkToken = null,
        bool byteFallback = false, bool fuseUnk = false, bool ignoreMerges = false)
    {
        this.vocab = vocab;
        var rank = 0;
        foreach (var pair in merges) ranks.TryAdd(pair, rank++);
        UnkToken = unkToken;
        ByteFallback = byteFallback;
        FuseUnk = fuseUnk;
        IgnoreMerges = ignoreMerges;
    }

    public string? UnkToken { get; }
    public bool ByteFallback { get; }
    public bool FuseUnk { get; }
    /// <summary>Llama 3: a word that is itself in the vocabulary is taken whole.</summary>
    public bool IgnoreMerges { get; }
    public IReadOnlyDictionary<string, int> Vocab => vocab;

    /// <summary>
    /// Reads the "model" object of tokenizer.json; merges may be "a b" strings or ["a", "b"] arrays. Checked as tokenizers'
    /// BPE builder checks it: ids are distinct non-negative integers, every merge's parts and result are in the vocabulary,
    /// and so is unk_token. Errors name the field inside "model".
    /// </summary>
    public static BpeModel FromJson(JsonElement model)
    {
        if (model.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"expected an object with \"type\": \"BPE\", found {JsonFields.Kind(model)}");
        var type = model.OptionalString("type") ?? "BPE";
        if (type != "BPE") throw new NotSupportedException($"tokenizer model type '{type}' is not supported (BPE only)");
        var vocabJson = model.Required("vocab");
        if (vocabJson.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"'vocab' is {JsonFields.Kind(vocabJson)}; expected an object of token: id");
        var vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        var tokenOf = new Dictionary<int, string>();
        foreach (var p in vocabJson.EnumerateObject())
        {
            var id = p.Value.AsInt($"vocab.{p.Name}");
            if (id < 0) throw new InvalidDataException($"'vocab.{p.Name}' has id {id}; ids must not be negative");
            if (!tokenOf.TryAdd(id, p.Name)) throw new InvalidDataException($"'vocab.{p.Name}' has id {id}, which '{tokenOf[id]}' has too; ids must be distinct");
            vocab[p.Name] = id;
        }
        // As tokenizers builds the merged token: the right part loses continuing_subword_prefix when it has one.
        var prefix = model.OptionalString("continuing_subword_prefix") ?? "";
        var merges = new List<(string, string)>();
        if (model.TryGetProperty("merges", out var m) && m.ValueKind != JsonValueKind.Null)
        {
            var index = 0;
            foreach (var e in m.AsArray("merges"))
            {
                var field = $"merges[{index++}]";
                (string a, string b) pair;
                if (e.ValueKind == JsonValueKind.Array)
                {
                    if (e.GetArrayLength() != 2) throw new InvalidDataException($"'{field}' has {e.GetArrayLength()} parts; a merge is [\"a\", \"b\"]");
                    pair = (e[0].AsString(field), e[1].AsString(field));
                }
                else
                {
                    var s = e.AsString(field);
                    var space = s.Length > 1 ? s.IndexOf(' ', 1) : -1; // a merge's left part is never empty
                    if (space < 0) throw new InvalidDataException($"'{field}' is '{s}', not 'a b'");
                    pair = (s[..space], s[(space + 1)..]);
                }
                var merged = pair.a + (prefix.Length > 0 && pair.b.StartsWith(prefix, StringComparison.Ordinal) ? pair.b[prefix.Length..] : pair.b);
                foreach (var part in new[] { pair.a, pair.b, merged })
                    if (!vocab.ContainsKey(part)) throw new InvalidDataException($"'{field}' ({pair.a} {pair.b}) uses '{part}', which is not in 'vocab'");
                merges.Add(pair);
            }
        }
        var unk = model.OptionalString("unk_token");
        if (unk is not null && !vocab.ContainsKey(unk)) throw new InvalidDataException($"'unk_token' '{unk}' is not in 'vocab'");
        return new BpeModel(vocab, merges, unk, model.OptionalBool("byte_fallback"), model.OptionalBool("fuse_unk"), model.OptionalBool("ignore_merges"));
    }

    /// <summary>Token ids of one pre-tokenized word.</summary>
    /// <exception cref="UnencodableTextException">A character of the word is neither in the vocabulary nor covered by byte fallback or unk_token.</exception>
    public int[] Tokenize(string word)
    {
        if (word.Length == 0) return [];
        return cache.GetOrAdd(word, TokenizeUncached);
    }

    private int[] TokenizeUncached(string word)
    {
        if (IgnoreMerges && vocab.TryGetValue(word, out var whole)) return [whole];
        var symbols = new List<string>();
        for (var i = 0; i < word.Length; i += char.IsSurrogatePair(word, i) ? 2 : 1)
            symbols.Add(char.IsSurrogatePair(word, i) ? word.Substring(i, 2) : word[i].ToString());

        while (symbols.Count > 1)
        {
            var best = -1;
            var bestRank = int.MaxValue;
            for (var i = 0; i + 1 < symbols.Count; i++)
                if (ranks.TryGetValue((symbols[i], symbols[i + 1]), out var r) && r < bestRank)
                {
                    bestRank = r;
                    best = i;
                }
            if (best < 0) break;
            symbols[best] += symbols[best + 1];
            symbols.RemoveAt(best + 1);
        }

        var ids = new List<int>();
        var lastWasUnk = false;
        foreach (var s in symbols)
        {
            if (vocab.TryGetValue(s, out var id))
            {
                ids.Add(id);
                lastWasUnk = false;
                continue;
            }
            if (ByteFallback && TryBytes(s, ids))
            {
                lastWasUnk = false;
                continue;
            }
            if (UnkToken is null || !vocab.TryGetValue(UnkToken, out var unk))
                throw new UnencodableTextException(s, position: null); // Tokenizer.Encode finds it in the text
            if (!(FuseUnk && lastWasUnk)) ids.Add(unk);
            lastWasUnk = true;
        }
        return ids.ToArray();
    }

    /// <summary>SentencePiece byte fallback: one &lt;0xNN&gt; token per UTF-8 byte, only if all exist.</summary>
    private bool TryBytes(string symbol, List<int> ids)
    {
        var bytes = System.Text.Encoding.UTF8.GetBytes(symbol);
        var found = new int[bytes.Length];
        for (var i = 0; i < bytes.Length; i++)
            if (!vocab.TryGetValue($"<0x{bytes[i]:X2}>", out found[i])) return false;
        ids.AddRange(found);
        return true;
    }
}
