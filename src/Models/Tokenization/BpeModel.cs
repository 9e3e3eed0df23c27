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

    /// <summary>Reads the "model" object of tokenizer.json; merges may be "a b" strings or ["a", "b"] arrays.</summary>
    public static BpeModel FromJson(JsonElement model)
    {
        var type = model.TryGetProperty("type", out var t) ? t.GetString() : "BPE";
        if (type != "BPE") throw new NotSupportedException($"tokenizer model type '{type}' is not supported (BPE only)");
        var vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var p in model.GetProperty("vocab").EnumerateObject()) vocab[p.Name] = p.Value.GetInt32();
        var merges = new List<(string, string)>();
        if (model.TryGetProperty("merges", out var m))
            foreach (var e in m.EnumerateArray())
            {
                if (e.ValueKind == JsonValueKind.Array) merges.Add((e[0].GetString()!, e[1].GetString()!));
                else
                {
                    var s = e.GetString()!;
                    var space = s.IndexOf(' ', 1); // a merge's left part is never empty
                    if (space < 0) throw new InvalidDataException($"tokenizer.json: merge '{s}' is not 'a b'");
                    merges.Add((s[..space], s[(space + 1)..]));
                }
            }
        string? Str(string name) => model.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;
        bool Flag(string name) => model.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.True;
        return new BpeModel(vocab, merges, Str("unk_token"), Flag("byte_fallback"), Flag("fuse_unk"), Flag("ignore_merges"));
    }

    /// <summary>Token ids of one pre-tokenized word.</summary>
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
                throw new InvalidOperationException($"'{s}' is not in the vocabulary and the tokenizer has no unk_token");
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
