// The embedded default: a character-level world that the repo generates itself (nothing is downloaded).
// Pretraining teaches a small Llama simple sentences and to copy letter strings ("copy abcd = abcd");
// the downstream task, rot1 ("rot1 abcd = bcde"), is one it has never seen: fine-tuning must teach it.
#nullable enable
using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.Models;
using LoRAHub.Models.Generation;
using LoRAHub.Models.Tokenization;
using LoRAHub.Training.Data;

public static class Demo
{
    public const string Alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;=?!'-\n";
    public const int WordLength = 4;

    /// <summary>A Hugging Face tokenizer.json with one token per character (BPE without merges) and three specials.</summary>
    public static string TokenizerJson()
    {
        var vocab = new Dictionary<string, int> { ["<pad>"] = 0, ["<s>"] = 1, ["</s>"] = 2 };
        foreach (var c in Alphabet) vocab[c.ToString()] = vocab.Count;
        var added = new[] { "<pad>", "<s>", "</s>" }.Select((t, i) => new { id = i, content = t, single_word = false, lstrip = false, rstrip = false, normalized = false, special = true });
        var doc = new
        {
            version = "1.0",
            added_tokens = added,
            normalizer = (object?)null,
            pre_tokenizer = (object?)null,
            post_processor = (object?)null,
            decoder = new { type = "Fuse" }, // characters join without spaces
            model = new { type = "BPE", dropout = (object?)null, unk_token = (string?)null, fuse_unk = false, byte_fallback = false, vocab, merges = Array.Empty<string>() },
        };
        return JsonSerializer.Serialize(doc, new JsonSerializerOptions { WriteIndented = true });
    }

    private static readonly string[] Adjectives = ["red", "small", "quick", "lazy", "old", "bright", "quiet", "green", "tall", "cold"];
    private static readonly string[] Nouns = ["fox", "dog", "cat", "bird", "tree", "river", "house", "child", "boat", "stone", "cloud", "road"];
    private static readonly string[] Verbs = ["sees", "likes", "finds", "follows", "passes", "hears", "draws", "keeps"];

    public static string RandomWord(Random rng) => new(Enumerable.Range(0, WordLength).Select(_ => (char)('a' + rng.Next(26))).ToArray());

    public static string Rot1(string word) => new(word.Select(c => (char)('a' + (c - 'a' + 1) % 26)).ToArray());

    /// <summary>Pretraining text: simple sentences, counting, and copy lines.</summary>
    public static IEnumerable<string> PretrainingLines(int count, int seed)
    {
        var rng = new Random(seed);
        string Pick(string[] words) => words[rng.Next(words.Length)];
        for (var i = 0; i < count; i++)
        {
            switch (rng.Next(3))
            {
                case 0:
                    yield return $"the {Pick(Adjectives)} {Pick(Nouns)} {Pick(Verbs)} the {Pick(Adjectives)} {Pick(Nouns)}.";
                    break;
                case 1:
                    var start = rng.Next(90);
                    yield return string.Join(" ", Enumerable.Range(start, 4 + rng.Next(4)));
                    break;
                default:
                    var w = RandomWord(rng);
                    yield return $"copy {w} = {w}";
                    break;
            }
        }
    }

    public static string Rot1Prompt(string word) => $"rot1 {word} = ";

    /// <summary>The downstream task: prompt tokens carry no loss, the answer and end of sequence do.</summary>
    public static TextDataset Rot1Dataset(Tokenizer tok, int count, int seed, ISet<string>? exclude = null)
    {
        var rng = new Random(seed);
        var examples = new List<TokenizedExample>();
        var seen = new HashSet<string>();
        while (examples.Count < count)
        {
            var w = RandomWord(rng);
            if ((exclude?.Contains(w) ?? false) || !seen.Add(w)) continue;
            var prompt = tok.Encode(Rot1Prompt(w), addSpecialTokens: false);
            var answer = tok.Encode(Rot1(w) + "\n", addSpecialTokens: false);
            examples.Add(new TokenizedExample([.. prompt, .. answer], [.. Enumerable.Repeat(-100, prompt.Length), .. answer]));
        }
        return new TextDataset(examples);
    }

    public static List<string> Rot1Words(int count, int seed, ISet<string>? exclude = null)
    {
        var rng = new Random(seed);
        var words = new List<string>();
        var seen = new HashSet<string>();
        while (words.Count < count)
        {
            var w = RandomWord(rng);
            if ((exclude?.Contains(w) ?? false) || !seen.Add(w)) continue;
            words.Add(w);
        }
        return words;
    }

    /// <summary>Greedy answers for each word's prompt (up to the newline).</summary>
    public static List<string> Answer(ICausalLanguageModel model, Tokenizer tok, IReadOnlyList<string> words)
    {
        var newline = tok.TokenToId("\n")!.Value;
        var prompts = words.Select(w => tok.Encode(Rot1Prompt(w), addSpecialTokens: false)).ToList();
        var outputs = TextGenerator.Generate(model, prompts, new GenerationOptions { MaxNewTokens = WordLength + 1, StopTokenIds = [newline], PadTokenId = tok.PadTokenId });
        return outputs.Select(o => tok.Decode(o).Trim()).ToList();
    }

    /// <summary>Exact-match accuracy on rot1.</summary>
    public static double ExactMatch(ICausalLanguageModel model, Tokenizer tok, IReadOnlyList<string> words)
    {
        var answers = Answer(model, tok, words);
        return words.Zip(answers).Count(p => Rot1(p.First) == p.Second) / (double)words.Count;
    }
}
