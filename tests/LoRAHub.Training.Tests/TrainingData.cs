using LoRAHub.Models.Llama;

namespace LoRAHub.Training.Tests;

/// <summary>The small data sets and model the trainer's tests share.</summary>
internal static class TrainingData
{
    public static readonly CharTokenizer Tok = new();

    /// <summary>"abcd=" → "bcde" and EOS: a shift-by-one task with prompts masked out (64 rows, CharTokenizer ids).</summary>
    public static TextDataset ShiftByOne()
    {
        var examples = new List<TokenizedExample>();
        var rng = new Random(3);
        for (var i = 0; i < 64; i++)
        {
            var word = new string(Enumerable.Range(0, 4).Select(_ => (char)('a' + rng.Next(20))).ToArray());
            var target = new string(word.Select(c => (char)(c + 1)).ToArray());
            var prompt = Tok.Encode(word + "=");
            var response = Tok.Encode(target).Append(1).ToArray();
            examples.Add(new TokenizedExample([.. prompt, .. response], [.. Enumerable.Repeat(-100, prompt.Length), .. response]));
        }
        return new TextDataset(examples);
    }

    /// <summary>48 rows of 3–23 random ids below 64, each with a masked prompt of its own length.</summary>
    public static TextDataset UnequalRows()
    {
        var rng = new Random(5);
        var rows = new List<TokenizedExample>();
        for (var i = 0; i < 48; i++)
        {
            var length = rng.Next(3, 24);
            var prompt = rng.Next(0, length - 2);
            var ids = Enumerable.Range(0, length).Select(_ => rng.Next(1, 64)).ToArray();
            rows.Add(new TokenizedExample(ids, ids.Select((t, j) => j < prompt ? -100 : t).ToArray()));
        }
        return new TextDataset(rows);
    }

    /// <summary>A two-layer GQA Llama over 64 ids.</summary>
    public static LlamaConfig TinyLlama() => new()
    {
        VocabSize = 64, HiddenSize = 32, IntermediateSize = 64, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
        MaxPositionEmbeddings = 128, RmsNormEps = 1e-6,
    };
}
