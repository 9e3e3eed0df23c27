using LoRAHub.Abstractions;
using LoRAHub.Models.Generation;

namespace LoRAHub.Host.Everyday;

/// <summary>One answer of <see cref="Generation.Run"/>.</summary>
/// <param name="FinishReason">"stop" (a stop token or string), or "length" (max tokens reached), as OpenAI reports it.</param>
public sealed record GenerationResult(string Adapter, string Prompt, string Text, int PromptTokens, int CompletionTokens, string FinishReason);

/// <summary>
/// The <c>generate</c> command's work, callable from scripts: every prompt with every adapter, in one batch whose rows
/// use their own adapter (<see cref="IAdapterSet.UseAdapterPerRow"/>). <see cref="IAdapterSet.BaseName"/> in the
/// adapter list means the base model alone. An adapter whose method cannot share a batch (GaLore, full fine-tuning) runs
/// in a batch of its own after the others (<see cref="AdapterHub.Batches"/>); results come in the order of the adapters.
/// </summary>
public static class Generation
{
    public static IReadOnlyList<GenerationResult> Run(LoadedModel model, AdapterHub? hub, IReadOnlyList<Prompt> prompts,
        IReadOnlyList<string> adapters, GenerationOptions options, IReadOnlyList<string>? stops = null)
    {
        if (prompts.Count == 0) throw new ArgumentException("give at least one prompt");
        var tokenizer = model.Tokenizer;
        // Each prompt encoded once, for the check below and for every adapter's row.
        var encoded = prompts.Select(p => p.Encode(tokenizer)).ToArray();
        // Past the model's positions GPT-2 has no position to read and a RoPE model drifts: refused up front, as serve does.
        if (model.ContextLength is int window && encoded.Max(ids => ids.Length) is var longest && longest + options.MaxNewTokens > window)
            throw new ArgumentException($"a prompt of {longest} tokens and {options.MaxNewTokens} new tokens need {longest + options.MaxNewTokens} " +
                $"positions, but the model has {window} (config.json's max_position_embeddings): shorten the prompt or ask for fewer new tokens");
        if (options.StopTokenIds.Count == 0 && tokenizer.EosTokenId is { } eos) options = options with { StopTokenIds = [eos] };
        options = options with { PadTokenId = tokenizer.PadTokenId };
        var names = adapters.Count == 0 ? [IAdapterSet.BaseName] : adapters;
        var pairs = names.SelectMany(a => prompts.Select((p, k) => new Row(a, p, encoded[k]))).ToList();
        if (hub is null && names.Any(n => n != IAdapterSet.BaseName)) throw new ArgumentException("adapters were named but no adapter hub was given");
        var results = new GenerationResult[pairs.Count];
        var batches = new Queue<IReadOnlyList<string>>(hub?.Batches(names) ?? [names]);
        while (batches.TryDequeue(out var batch))
        {
            var rows = Enumerable.Range(0, pairs.Count).Where(i => batch.Contains(pairs[i].Adapter)).ToList();
            try
            {
                var answers = RunBatch(model, hub, rows.Select(i => pairs[i]).ToList(), options, stops);
                for (var j = 0; j < rows.Count; j++) results[rows[j]] = answers[j];
            }
            catch (MixedBatchNotSupportedException) when (batch.Count > 1)
            {
                // Adapters that could not join one set after all (e.g. a DoRA one beside QLoRA's 4-bit base): one by one.
                foreach (var name in batch) batches.Enqueue([name]);
            }
        }
        return results;
    }

    // One answer to make: the adapter, the prompt and its token ids.
    private sealed record Row(string Adapter, Prompt Prompt, int[] Ids);

    private static List<GenerationResult> RunBatch(LoadedModel model, AdapterHub? hub, List<Row> pairs, GenerationOptions options,
        IReadOnlyList<string>? stops)
    {
        var tokenizer = model.Tokenizer;
        var (set, setNames, scope) = hub?.Prepare(pairs.Select(p => p.Adapter).ToList()) ?? (null, pairs.Select(p => p.Adapter).ToList(), null);
        var rows = pairs.Select((p, i) => new GenerationRow(p.Ids, options, setNames[i])).ToList();
        var streams = pairs.Select(_ => new TextStream(tokenizer, stops ?? [])).ToArray();
        int[][] tokens;
        using (scope)
            tokens = TextGenerator.Generate(model.Model, rows, set, (row, token) =>
            {
                streams[row].Add(token);
                return !streams[row].Stopped;
            });
        return pairs.Select((p, i) => new GenerationResult(p.Adapter, p.Prompt.Render(tokenizer), streams[i].Text, p.Ids.Length, tokens[i].Length,
            streams[i].Stopped || (tokens[i].Length > 0 && options.StopTokenIds.Contains(tokens[i][^1])) ? "stop" : "length")).ToList();
    }
}
