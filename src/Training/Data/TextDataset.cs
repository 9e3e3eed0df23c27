using LoRAHub.Abstractions;

namespace LoRAHub.Training.Data;

/// <summary>Tokenized examples loaded from JSONL, with a report of what was skipped.</summary>
public sealed class TextDataset
{
    public TextDataset(IReadOnlyList<TokenizedExample> examples, int skipped = 0, IReadOnlyList<string>? skipReasons = null)
    {
        Examples = examples;
        Skipped = skipped;
        SkipReasons = skipReasons ?? [];
    }

    public IReadOnlyList<TokenizedExample> Examples { get; }
    public int Skipped { get; }
    /// <summary>The first few skipped records' "file:line: reason".</summary>
    public IReadOnlyList<string> SkipReasons { get; }
    public int Count => Examples.Count;

    /// <summary>
    /// Reads a JSONL file; records longer than maxLength tokens are truncated. A malformed record fails the load
    /// (naming file, line and reason) or is skipped and counted, as the policy says.
    /// </summary>
    public static TextDataset LoadJsonl(string path, ITokenizer tokenizer, DataFormat format = DataFormat.Auto, int maxLength = 1024,
        MalformedRecordPolicy onMalformed = MalformedRecordPolicy.Fail)
    {
        var examples = new List<TokenizedExample>();
        var reasons = new List<string>();
        var skipped = 0;
        foreach (var line in JsonlReader.Read(path))
        {
            try
            {
                if (line.Error != null) throw new DataRecordException(path, line.Number, line.Error);
                TokenizedExample example;
                try
                {
                    example = RecordTokenizer.Tokenize(line.Record, format, tokenizer);
                }
                catch (FormatException e)
                {
                    throw new DataRecordException(path, line.Number, e.Message);
                }
                catch (Exception e) when (e is not OutOfMemoryException and not DataRecordException)
                {
                    // A tokenizer or chat template failing on this record: still an error at this file and line. Bad
                    // input (a character the vocabulary cannot encode) says so itself; anything else keeps its type.
                    throw new DataRecordException(path, line.Number, e is ArgumentException and not ArgumentNullException ? e.Message : $"{e.GetType().Name}: {e.Message}");
                }
                if (example.LabelCount == 0) throw new DataRecordException(path, line.Number, "the record has no tokens to learn from");
                examples.Add(example.Length <= maxLength ? example : new TokenizedExample(example.InputIds[..maxLength], example.Labels[..maxLength]));
            }
            catch (DataRecordException e) when (onMalformed == MalformedRecordPolicy.Skip)
            {
                skipped++;
                if (reasons.Count < 5) reasons.Add(e.Message);
            }
        }
        if (examples.Count == 0) throw new TrainingException($"{path} holds no usable records" + (skipped > 0 ? $" ({skipped} malformed: {string.Join("; ", reasons)})" : ""));
        return new TextDataset(examples, skipped, reasons);
    }

    /// <summary>A seeded split into train and eval sets.</summary>
    public (TextDataset Train, TextDataset Eval) Split(double evalFraction, long seed)
    {
        if (evalFraction <= 0 || evalFraction >= 1) throw new ArgumentOutOfRangeException(nameof(evalFraction), "use a fraction between 0 and 1");
        var order = Enumerable.Range(0, Count).ToArray();
        new Random(unchecked((int)seed)).Shuffle(order);
        var evalCount = Math.Max(1, (int)Math.Round(Count * evalFraction));
        return (new TextDataset(order.Skip(evalCount).Select(i => Examples[i]).ToList(), Skipped, SkipReasons),
                new TextDataset(order.Take(evalCount).Select(i => Examples[i]).ToList()));
    }
}
