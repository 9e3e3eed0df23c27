using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.Host.Plugins;
using LoRAHub.Models.Generation;
using LoRAHub.Training.Data;
using static TorchSharp.torch;

namespace LoRAHub.Host.Everyday;

/// <summary>What <see cref="Evaluation.Run"/> measured.</summary>
/// <param name="Loss">Mean next-token cross-entropy over every label token of the set (token-weighted, as the trainer's).</param>
/// <param name="ExactMatchTotal">Records with an answer to compare (instruction, prompt/completion, chat); text records have none.</param>
public sealed record EvaluationResult(string Data, string? Adapter, int Records, long LabelTokens, double Loss, double Perplexity,
    int ExactMatchTotal, int ExactMatches, double? ExactMatch);

/// <summary>
/// The <c>eval</c> command's work, callable from scripts: loss and perplexity on a JSONL set in the trainer's formats
/// (text, instruction, prompt/completion, chat; prompts masked as in training), and exact match: each record's prompt is
/// generated greedily (until eos, a stop string, or the answer's length plus one token) and compared with its answer,
/// surrounding whitespace ignored.
/// </summary>
public static class Evaluation
{
    public static EvaluationResult Run(IMethodRegistry methods, string baseModel, string data, string? adapterFolder = null,
        Device? device = null, ScalarType? dtype = null, DataFormat format = DataFormat.Auto, int maxLength = 1024, int batchSize = 8,
        bool exactMatch = true, int? maxNewTokens = null, IReadOnlyList<string>? stops = null, Action<int, int>? progress = null)
    {
        using var loaded = LoadedModel.Load(baseModel, device, dtype);
        IAdapter? adapter = null;
        if (adapterFolder is not null)
        {
            var full = Path.GetFullPath(adapterFolder);
            if (!Directory.Exists(full)) throw new DirectoryNotFoundException($"adapter folder not found: {full}");
            adapter = methods.ForFolder(full).Load(loaded.Model, full);
            adapter.SetTraining(false);
        }
        try
        {
            return Run(loaded, data, adapterFolder, format, maxLength, batchSize, exactMatch, maxNewTokens, stops, progress);
        }
        finally
        {
            adapter?.Dispose();
        }
    }

    /// <summary>On an already loaded model (with whatever adapter is active on it).</summary>
    public static EvaluationResult Run(LoadedModel loaded, string data, string? adapterLabel = null, DataFormat format = DataFormat.Auto,
        int maxLength = 1024, int batchSize = 8, bool exactMatch = true, int? maxNewTokens = null, IReadOnlyList<string>? stops = null,
        Action<int, int>? progress = null)
    {
        if (batchSize < 1) throw new ArgumentOutOfRangeException(nameof(batchSize), "batch size must be at least 1");
        var model = loaded.Model;
        var tokenizer = loaded.Tokenizer;
        var dataset = TextDataset.LoadJsonl(data, tokenizer, format, maxLength);
        var answers = exactMatch ? Answers(data, format) : [];
        var work = (dataset.Count + batchSize - 1) / batchSize + (answers.Count + batchSize - 1) / batchSize;
        var done = 0;

        double total = 0;
        long count = 0;
        model.Root.eval();
        using (no_grad())
            for (var i = 0; i < dataset.Count; i += batchSize)
            {
                using var scope = NewDisposeScope();
                var examples = dataset.Examples.Skip(i).Take(batchSize).ToList();
                // The loss is a mean over the shifted labels (the first token of a row predicts nothing): weight it by them.
                var shifted = examples.Sum(e => e.Labels.Skip(1).Count(l => l != TokenizedExample.IgnoreIndex));
                if (shifted == 0) continue;
                using var batch = DataLoader.Collate(examples, tokenizer.PadTokenId, model.Device);
                total += model.ComputeLoss(batch.InputIds, batch.Labels, batch.AttentionMask).to(ScalarType.Float64).item<double>() * shifted;
                count += shifted;
                progress?.Invoke(++done, work);
            }
        if (count == 0) throw NoLabelTokens(data, tokenizer, format, maxLength);
        var loss = total / count;

        var matches = 0;
        var eos = tokenizer.EosTokenId is { } e ? new[] { e } : [];
        for (var i = 0; i < answers.Count; i += batchSize)
        {
            var chunk = answers.Skip(i).Take(batchSize).ToList();
            var rows = chunk.Select(a => new GenerationRow(a.Prompt.Encode(tokenizer), new GenerationOptions
            {
                MaxNewTokens = maxNewTokens ?? tokenizer.Encode(a.Answer, addSpecialTokens: false).Length + 1,
                StopTokenIds = eos,
                PadTokenId = tokenizer.PadTokenId,
            })).ToList();
            var streams = chunk.Select(_ => new TextStream(tokenizer, stops ?? [])).ToArray();
            TextGenerator.Generate(model, rows, null, (row, token) =>
            {
                streams[row].Add(token);
                return !streams[row].Stopped;
            });
            matches += chunk.Where((a, k) => streams[k].Text.Trim() == a.Answer.Trim()).Count();
            progress?.Invoke(++done, work);
        }
        return new EvaluationResult(Path.GetFullPath(data), adapterLabel, dataset.Count, count, loss, Math.Exp(loss),
            answers.Count, matches, answers.Count == 0 ? null : (double)matches / answers.Count);
    }

    /// <summary>
    /// Every record was cut before its first label token (a record always has one: the loader refuses those without),
    /// so the loss would be NaN: say which --max-length keeps one, from the records as they are before truncation.
    /// </summary>
    private static ArgumentException NoLabelTokens(string data, ITokenizer tokenizer, DataFormat format, int maxLength)
    {
        var whole = TextDataset.LoadJsonl(data, tokenizer, format, int.MaxValue).Examples;
        // The first token predicts nothing (the loss is over shifted labels): a record needs a label after its first token.
        var needed = whole.Select(e => Array.FindIndex(e.Labels, 1, l => l != TokenizedExample.IgnoreIndex) + 1).Where(n => n > 0).DefaultIfEmpty(0).Min();
        var longest = whole.Max(e => e.Length);
        return new ArgumentException($"no label tokens left after truncating records to {maxLength} tokens (--max-length): " +
            (needed > 0 ? $"raise it to at least {needed} (the longest record has {longest} tokens)"
                        : "every record's labels are its first token alone, which predicts nothing; give records with longer answers"));
    }

    /// <summary>(prompt, answer) of every record that has an answer, read with the trainer's field rules.</summary>
    private static List<(Prompt Prompt, string Answer)> Answers(string data, DataFormat format)
    {
        var result = new List<(Prompt, string)>();
        foreach (var line in JsonlReader.Read(data))
        {
            if (line.Error is not null) continue; // LoadJsonl has already refused a malformed file
            var r = line.Record;
            var kind = format != DataFormat.Auto ? format
                : r.TryGetProperty("messages", out _) ? DataFormat.Chat
                : r.TryGetProperty("instruction", out _) ? DataFormat.Instruction
                : r.TryGetProperty("prompt", out _) ? DataFormat.PromptCompletion
                : DataFormat.Text;
            switch (kind)
            {
                case DataFormat.Instruction:
                    result.Add((Prompt.FromText(RecordTokenizer.AlpacaPrompt(Text(r, "instruction"), Optional(r, "input"))), Text(r, "output")));
                    break;
                case DataFormat.PromptCompletion:
                    result.Add((Prompt.FromText(Text(r, "prompt")), Text(r, "completion")));
                    break;
                case DataFormat.Chat:
                    var messages = r.GetProperty("messages").EnumerateArray().Select(m => (Text(m, "role"), Text(m, "content"))).ToList();
                    var last = messages.FindLastIndex(m => m.Item1 == "assistant");
                    if (last > 0) result.Add((Prompt.FromMessages(messages.Take(last).ToList()), messages[last].Item2));
                    break;
            }
        }
        return result;
    }

    private static string Text(JsonElement r, string name) => r.GetProperty(name).GetString()!;

    private static string? Optional(JsonElement r, string name) =>
        r.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;
}
