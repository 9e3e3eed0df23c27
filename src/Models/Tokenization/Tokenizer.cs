using System.Text.Json;
using LoRAHub.Abstractions;

namespace LoRAHub.Models.Tokenization;

/// <summary>
/// A Hugging Face tokenizer.json (BPE model) in C#: added tokens are split out first, every other segment is
/// normalized, pre-tokenized and BPE-encoded; the post-processor adds bos/eos; the decoder reverses it all.
/// Covers GPT-2/Llama-3/Qwen2 byte-level BPE and Llama-2/TinyLlama/Mistral SentencePiece-style BPE.
/// </summary>
public sealed class Tokenizer : ITokenizer
{
    private readonly BpeModel model;
    private readonly Func<string, string> normalize;
    private readonly PreTokenizer.Step preTokenize;
    private readonly Func<List<string>, string> decode;
    private readonly PostProcessor post;
    private readonly List<AddedToken> added; // longest first, so "<|im_start|>" wins over a shorter prefix
    private readonly Dictionary<char, AddedToken[]> addedByFirstChar;
    private readonly Dictionary<int, string> idToToken = new();
    private readonly HashSet<int> specialIds = new();

    private Tokenizer(BpeModel model, Func<string, string> normalize, PreTokenizer.Step preTokenize,
        Func<List<string>, string> decode, PostProcessor post, List<AddedToken> added)
    {
        this.model = model;
        this.normalize = normalize;
        this.preTokenize = preTokenize;
        this.decode = decode;
        this.post = post;
        this.added = added.OrderByDescending(a => a.Content.Length).ToList();
        addedByFirstChar = this.added.Where(a => a.Content.Length > 0).GroupBy(a => a.Content[0]).ToDictionary(g => g.Key, g => g.ToArray());
        foreach (var (token, id) in model.Vocab) idToToken[id] = token;
        foreach (var a in added)
        {
            idToToken[a.Id] = a.Content;
            if (a.Special) specialIds.Add(a.Id);
        }
        VocabSize = idToToken.Count == 0 ? 0 : idToToken.Keys.Max() + 1;
        BosTokenId = post.BosTokenId ?? FirstKnown("<s>", "<|begin_of_text|>", "<bos>");
        EosTokenId = FirstKnown("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>");
    }

    public int VocabSize { get; }
    public int? BosTokenId { get; set; }
    public int? EosTokenId { get; set; }
    /// <summary>Padding id: pad_token when known, else eos, else 0 (as the trainer masks padding anyway).</summary>
    public int PadTokenId => explicitPad ?? EosTokenId ?? 0;
    private int? explicitPad;
    /// <summary>Prepend bos in Encode even if the post-processor does not (tokenizer_config.json add_bos_token).</summary>
    public bool AddBosToken { get; set; }
    public bool AddEosToken { get; set; }
    /// <summary>The chat format used by <see cref="ApplyChatTemplate"/>.</summary>
    public ChatTemplate ChatTemplate { get; set; } = ChatTemplate.Get("plain");

    /// <summary>
    /// Whether tokenizer_config.json has a chat_template. Without one, or with one of a format we do not recognise,
    /// <see cref="ChatTemplate"/> is plain "role: content" lines.
    /// </summary>
    public bool HasChatTemplate { get; private set; }

    /// <summary>
    /// Reads tokenizer.json. A file that is not a tokenizer (not JSON, a field missing or of the wrong kind, ids out of
    /// range, merges of unknown tokens) is a <see cref="TokenizerFileException"/> naming the file and the field; a valid
    /// file using what we do not implement (a Unigram model, an unknown normalizer) is a NotSupportedException naming it.
    /// </summary>
    public static Tokenizer FromFile(string path)
    {
        var field = "(file)";
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"the file holds {JsonFields.Kind(root)}, not a tokenizer object");
            JsonElement? Get(string name) => root.TryGetProperty(name, out var v) && v.ValueKind != JsonValueKind.Null ? v : null;

            field = "added_tokens";
            var added = new List<AddedToken>();
            if (Get("added_tokens") is { } list)
                foreach (var a in list.AsArray("added_tokens"))
                {
                    field = $"added_tokens[{added.Count}]";
                    var id = a.Required("id").AsInt("id");
                    if (id < 0) throw new InvalidDataException($"'id' is {id}; ids must not be negative");
                    added.Add(new AddedToken(id, a.RequiredString("content"), a.OptionalBool("special"), a.OptionalBool("lstrip"), a.OptionalBool("rstrip")));
                }

            field = "model";
            var model = BpeModel.FromJson(root.Required("model"));
            // Ids index the embedding matrix: one far past the number of tokens would make VocabSize (and the model it
            // is checked against) absurd.
            var count = model.Vocab.Count + added.Count;
            foreach (var (token, id) in model.Vocab)
                if (id >= count) throw new InvalidDataException($"'vocab.{token}' has id {id}, beyond the {count} tokens of the vocabulary and added_tokens");
            field = "added_tokens";
            foreach (var a in added)
                if (a.Id >= count) throw new InvalidDataException($"'{a.Content}' has id {a.Id}, beyond the {count} tokens of the vocabulary and added_tokens");

            field = "normalizer";
            var normalize = Normalizer.FromJson(Get("normalizer"));
            field = "pre_tokenizer";
            var preTokenize = PreTokenizer.FromJson(Get("pre_tokenizer"));
            field = "decoder";
            var decode = Decoder.FromJson(Get("decoder"));
            field = "post_processor";
            var post = PostProcessor.FromJson(Get("post_processor"));
            return new Tokenizer(model, normalize, preTokenize, decode, post, added);
        }
        catch (NotSupportedException e)
        {
            throw new NotSupportedException($"{path}: '{field}': {e.Message}", e);
        }
        catch (Exception e) when (e is JsonException or InvalidDataException or InvalidOperationException or KeyNotFoundException
                                      or FormatException or ArgumentException or IndexOutOfRangeException)
        {
            throw new TokenizerFileException(path, field, e.Message, e);
        }
    }

    /// <summary>
    /// Reads a model folder's tokenizer.json plus tokenizer_config.json when present (bos/eos/pad tokens,
    /// add_bos_token, and the chat format guessed from chat_template, which must be well-formed Jinja).
    /// </summary>
    public static Tokenizer FromFolder(string folder)
    {
        var path = Path.Combine(folder, "tokenizer.json");
        if (!File.Exists(path)) throw new FileNotFoundException($"{folder} has no tokenizer.json (only the Hugging Face fast-tokenizer format is supported)", path);
        var tokenizer = FromFile(path);
        var configPath = Path.Combine(folder, "tokenizer_config.json");
        if (!File.Exists(configPath)) return tokenizer;
        var field = "(file)";
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(configPath));
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"the file holds {JsonFields.Kind(root)}, not an object");
            int? Token(string name)
            {
                if (!root.TryGetProperty(name, out var v)) return null;
                var content = v.ValueKind == JsonValueKind.String ? v.GetString()
                    : v.ValueKind == JsonValueKind.Object && v.TryGetProperty("content", out var c) && c.ValueKind == JsonValueKind.String ? c.GetString() : null;
                return content is null ? null : tokenizer.TokenToId(content);
            }
            tokenizer.BosTokenId = Token("bos_token") ?? tokenizer.BosTokenId;
            tokenizer.EosTokenId = Token("eos_token") ?? tokenizer.EosTokenId;
            tokenizer.explicitPad = Token("pad_token");
            // Only when the post-processor does not already add bos (Llama 2 files carry both).
            tokenizer.AddBosToken = root.TryGetProperty("add_bos_token", out var ab) && ab.ValueKind == JsonValueKind.True && tokenizer.post.IsEmpty;
            tokenizer.AddEosToken = root.TryGetProperty("add_eos_token", out var ae) && ae.ValueKind == JsonValueKind.True && tokenizer.post.IsEmpty;
            field = "chat_template";
            if (ChatTemplateText(root) is { } jinja)
            {
                ChatTemplate.CheckJinja(jinja);
                tokenizer.ChatTemplate = ChatTemplate.Guess(jinja);
                tokenizer.HasChatTemplate = true;
            }
        }
        catch (Exception e) when (e is JsonException or InvalidDataException or InvalidOperationException or FormatException)
        {
            throw new TokenizerFileException(configPath, field, e.Message, e);
        }
        return tokenizer;
    }

    /// <summary>chat_template as a string, or transformers' list of {name, template} (the one named "default").</summary>
    private static string? ChatTemplateText(JsonElement root)
    {
        if (!root.TryGetProperty("chat_template", out var ct) || ct.ValueKind == JsonValueKind.Null) return null;
        if (ct.ValueKind == JsonValueKind.String) return ct.GetString();
        if (ct.ValueKind != JsonValueKind.Array)
            throw new InvalidDataException($"'chat_template' is {JsonFields.Kind(ct)}; expected a Jinja string or a list of {{\"name\", \"template\"}}");
        foreach (var named in ct.EnumerateArray())
            if (named.RequiredString("name") == "default") return named.RequiredString("template");
        return null;
    }

    private int? FirstKnown(params string[] tokens) => tokens.Select(TokenToId).FirstOrDefault(id => id.HasValue);

    public int? TokenToId(string token) =>
        added.FirstOrDefault(a => a.Content == token)?.Id ?? (model.Vocab.TryGetValue(token, out var id) ? id : null);

    public string? IdToToken(int id) => idToToken.GetValueOrDefault(id);

    public bool IsSpecial(int id) => specialIds.Contains(id);

    /// <exception cref="UnencodableTextException">A character the vocabulary cannot encode (no byte fallback, no unk_token), named with its position.</exception>
    public int[] Encode(string text, bool addSpecialTokens = true)
    {
        var ids = new List<int>();
        foreach (var (segment, token, start) in SplitAddedTokens(text))
        {
            if (token is not null)
            {
                ids.Add(token.Id);
                continue;
            }
            try
            {
                ids.AddRange(EncodeSegment(segment, start == 0));
            }
            catch (UnencodableTextException e) when (e.Position is null)
            {
                throw Unencodable(segment, start) ?? e;
            }
        }
        if (!addSpecialTokens) return ids.ToArray();
        var result = post.Apply(ids);
        if (AddBosToken && BosTokenId is { } bos && (result.Count == 0 || result[0] != bos)) result.Insert(0, bos);
        if (AddEosToken && EosTokenId is { } eos) result.Add(eos);
        return result.ToArray();
    }

    private IEnumerable<int> EncodeSegment(string segment, bool first)
    {
        var normalized = normalize(segment);
        if (normalized.Length == 0) return [];
        return preTokenize([normalized], first).SelectMany(model.Tokenize).ToList();
    }

    /// <summary>
    /// The first character of a segment that cannot be encoded on its own, with its position in the whole text, or null.
    /// The model names the failing symbol after normalization and pre-tokenization (e.g. byte-level's mapped
    /// characters); the user needs the character as they wrote it.
    /// </summary>
    private UnencodableTextException? Unencodable(string segment, int start)
    {
        for (var i = 0; i < segment.Length; i += char.IsSurrogatePair(segment, i) ? 2 : 1)
        {
            var character = char.IsSurrogatePair(segment, i) ? segment.Substring(i, 2) : segment[i].ToString();
            try
            {
                EncodeSegment(character, start + i == 0);
            }
            catch (UnencodableTextException)
            {
                return new UnencodableTextException(character, start + i);
            }
        }
        return null;
    }

    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens = true)
    {
        var tokens = new List<string>();
        foreach (var id in ids)
        {
            if (skipSpecialTokens && specialIds.Contains(id)) continue;
            tokens.Add(idToToken.TryGetValue(id, out var t) ? t : throw new ArgumentOutOfRangeException(nameof(ids), $"token id {id} is not in the vocabulary ({VocabSize})"));
        }
        return tokens.Count == 0 ? "" : decode(tokens);
    }

    public string ApplyChatTemplate(IReadOnlyList<(string Role, string Content)> messages, bool addGenerationPrompt) =>
        ChatTemplate.Apply(messages, addGenerationPrompt);

    /// <summary>Segments of text between added tokens (token null) and the added tokens themselves, with start offsets.</summary>
    private List<(string text, AddedToken? token, int start)> SplitAddedTokens(string text)
    {
        var result = new List<(string, AddedToken?, int)>();
        int segmentStart = 0, i = 0;
        while (i < text.Length)
        {
            var hit = addedByFirstChar.TryGetValue(text[i], out var candidates)
                ? candidates.FirstOrDefault(a => string.CompareOrdinal(text, i, a.Content, 0, a.Content.Length) == 0)
                : null;
            if (hit is null)
            {
                i++;
                continue;
            }
            var segmentEnd = i;
            if (hit.LStrip) while (segmentEnd > segmentStart && char.IsWhiteSpace(text[segmentEnd - 1])) segmentEnd--;
            if (segmentEnd > segmentStart) result.Add((text[segmentStart..segmentEnd], null, segmentStart));
            result.Add((hit.Content, hit, i));
            i += hit.Content.Length;
            if (hit.RStrip) while (i < text.Length && char.IsWhiteSpace(text[i])) i++;
            segmentStart = i;
        }
        if (segmentStart < text.Length) result.Add((text[segmentStart..], null, segmentStart));
        return result;
    }
}
