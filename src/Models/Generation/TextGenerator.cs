using LoRAHub.Abstractions;
using LoRAHub.Models.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Models.Generation;

/// <summary>
/// Autoregressive decoding with a KV cache (transformers' generate). Prompts of different lengths are left-padded and
/// masked, so every row's next token is read from the last column. Sampling happens on the host with a seeded Random.
/// The model runs in eval mode during generation and is put back in the mode it was in. (Not named Generator: that is
/// torch.Generator, the random-number generator, which code sees through <c>using static TorchSharp.torch</c>.)
/// </summary>
public static class TextGenerator
{
    /// <summary>Generates from one text prompt and returns the new text (special tokens removed).</summary>
    public static string Generate(ICausalLanguageModel model, Tokenizer tokenizer, string prompt, GenerationOptions options)
    {
        var stops = options.StopTokenIds.Count > 0 || tokenizer.EosTokenId is null ? options.StopTokenIds : [tokenizer.EosTokenId.Value];
        var ids = tokenizer.Encode(prompt);
        var output = Generate(model, [ids], options with { StopTokenIds = stops, PadTokenId = tokenizer.PadTokenId })[0];
        return tokenizer.Decode(output);
    }

    /// <summary>Generates from several text prompts at once (left-padded batch); returns each new text.</summary>
    public static string[] Generate(ICausalLanguageModel model, Tokenizer tokenizer, IReadOnlyList<string> prompts, GenerationOptions options)
    {
        var stops = options.StopTokenIds.Count > 0 || tokenizer.EosTokenId is null ? options.StopTokenIds : [tokenizer.EosTokenId.Value];
        var ids = prompts.Select(p => tokenizer.Encode(p)).ToArray();
        return Generate(model, ids, options with { StopTokenIds = stops, PadTokenId = tokenizer.PadTokenId })
            .Select(o => tokenizer.Decode(o)).ToArray();
    }

    /// <summary>New token ids for each prompt (stop token included when hit).</summary>
    public static int[][] Generate(ICausalLanguageModel model, IReadOnlyList<int[]> prompts, GenerationOptions options)
    {
        // One generator shared by the rows, drawn in row order (what this overload has always done).
        var random = new Random(options.Seed);
        return Decode(model, prompts.Select(p => new GenerationRow(p, options)).ToList(), prompts.Select(_ => random).ToArray(), null, null, default);
    }

    /// <summary>
    /// Mixed-batch generation: each row with its own options and adapter, in one left-padded batch with one forward per
    /// step. Rows are independent: a row's greedy tokens equal what it gives alone, and a sampling row draws from its own
    /// generator seeded with its Seed, so its tokens do not depend on its neighbours either. With several adapters the
    /// batch runs inside <see cref="IAdapterSet.UseAdapterPerRow"/>; <paramref name="onToken"/> sees each token as it is
    /// chosen (streaming) and can finish a row early.
    /// </summary>
    /// <returns>New token ids per row (stop token included when hit).</returns>
    public static int[][] Generate(ICausalLanguageModel model, IReadOnlyList<GenerationRow> rows, IAdapterSet? adapters = null,
        TokenSink? onToken = null, CancellationToken cancellation = default)
    {
        if (adapters is null && rows.FirstOrDefault(r => r.Adapter != IAdapterSet.BaseName) is { } row)
            throw new ArgumentException($"row asks for adapter '{row.Adapter}' but no adapter set was given", nameof(rows));
        var randoms = rows.Select(r => new Random(r.Options.Seed)).ToArray();
        return Decode(model, rows, randoms, adapters, onToken, cancellation);
    }

    private static int[][] Decode(ICausalLanguageModel model, IReadOnlyList<GenerationRow> rows, Random[] randoms, IAdapterSet? adapters,
        TokenSink? onToken, CancellationToken cancellation)
    {
        if (rows.Count == 0) return [];
        if (rows.Any(r => r.Prompt.Length == 0)) throw new ArgumentException("every prompt needs at least one token (e.g. bos)");
        var shared = rows[0].Options;
        var batch = rows.Count;
        var longest = rows.Max(r => r.Prompt.Length);
        var padded = new long[batch * longest];
        var mask = new long[batch * longest];
        for (var b = 0; b < batch; b++)
        {
            var prompt = rows[b].Prompt;
            var offset = longest - prompt.Length;
            for (var i = 0; i < longest; i++)
            {
                padded[b * longest + i] = i < offset ? shared.PadTokenId : prompt[i - offset];
                mask[b * longest + i] = i < offset ? 0 : 1;
            }
        }

        var outputs = Enumerable.Range(0, batch).Select(_ => new List<int>()).ToArray();
        var finished = rows.Select(r => r.Options.MaxNewTokens <= 0).ToArray();
        var wasTraining = model.Root.training;
        model.Root.eval();
        var perRow = adapters?.UseAdapterPerRow(rows.Select(r => r.Adapter).ToList());
        try
        {
            Decode(model, padded, mask, batch, longest, rows, randoms, outputs, finished, onToken, cancellation);
        }
        finally
        {
            perRow?.Dispose();
            if (wasTraining) model.Root.train();
        }
        return outputs.Select(o => o.ToArray()).ToArray();
    }

    private static void Decode(ICausalLanguageModel model, long[] padded, long[] mask, int batch, int longest, IReadOnlyList<GenerationRow> rows,
        Random[] randoms, List<int>[] outputs, bool[] finished, TokenSink? onToken, CancellationToken cancellation)
    {
        var device = model.Device;
        var shared = rows[0].Options;
        var steps = rows.Max(r => r.Options.MaxNewTokens);
        using var noGrad = no_grad();
        using var cache = shared.UseCache ? new KvCache(model.LayerCount) : null;
        using var scope = NewDisposeScope();
        var sequence = tensor(padded, [batch, longest], device: device);
        var attention = tensor(mask, [batch, longest], device: device);
        var input = sequence;
        for (var step = 0; step < steps && !finished.All(f => f); step++)
        {
            cancellation.ThrowIfCancellationRequested();
            using var stepScope = NewDisposeScope();
            var logits = model.Forward(input, attention, cache);
            var last = logits.select(1, logits.size(1) - 1).to(ScalarType.Float32).contiguous();
            var next = Choose(last, rows, randoms, finished);
            for (var b = 0; b < batch; b++)
            {
                if (finished[b])
                {
                    next[b] = shared.PadTokenId;
                    continue;
                }
                var token = (int)next[b];
                outputs[b].Add(token);
                var options = rows[b].Options;
                if (options.StopTokenIds.Contains(token) || outputs[b].Count >= options.MaxNewTokens) finished[b] = true;
                if (onToken is not null && !onToken(b, token)) finished[b] = true;
            }
            var nextTensor = tensor(next, [batch, 1], device: device);
            var ones = torch.ones([batch, 1], ScalarType.Int64, device);
            // The grown tensors outlive this step; the ones they replace are freed now.
            var (oldAttention, oldSequence, oldInput) = (attention, sequence, input);
            attention = cat([attention, ones], 1).MoveToOuterDisposeScope();
            sequence = cat([sequence, nextTensor], 1).MoveToOuterDisposeScope();
            input = shared.UseCache ? nextTensor.MoveToOuterDisposeScope() : sequence;
            if (!ReferenceEquals(oldInput, oldSequence)) oldInput.Dispose();
            oldAttention.Dispose();
            oldSequence.Dispose();
        }
    }

    /// <summary>Next token per row from fp32 logits (batch, vocab): argmax for greedy rows, each sampling row from its generator.</summary>
    private static long[] Choose(Tensor logits, IReadOnlyList<GenerationRow> rows, Random[] randoms, bool[] finished)
    {
        var greedy = logits.argmax(-1).data<long>().ToArray();
        if (rows.All(r => r.Options.Temperature <= 0)) return greedy;
        var vocab = (int)logits.size(1);
        var all = logits.data<float>().ToArray();
        for (var b = 0; b < rows.Count; b++)
            if (rows[b].Options.Temperature > 0) // finished rows draw too, as they always have: a shared generator's sequence stays the same
                greedy[b] = Sample(all.AsSpan(b * vocab, vocab), rows[b].Options, randoms[b]);
        return greedy;
    }

    private static int Sample(ReadOnlySpan<float> logits, GenerationOptions options, Random random)
    {
        // Candidates sorted by logit, cut by top-k, then softmax with temperature, then cut by top-p.
        var order = Enumerable.Range(0, logits.Length).ToArray();
        var values = logits.ToArray();
        Array.Sort(values.Select(v => -v).ToArray(), order);
        var k = options.TopK > 0 ? Math.Min(options.TopK, order.Length) : order.Length;
        var max = values[order[0]];
        var probs = new double[k];
        double total = 0;
        for (var i = 0; i < k; i++) total += probs[i] = Math.Exp((values[order[i]] - max) / options.Temperature);
        var keep = k;
        if (options.TopP < 1.0)
        {
            double cumulative = 0;
            for (var i = 0; i < k; i++)
            {
                cumulative += probs[i] / total;
                if (cumulative >= options.TopP) { keep = i + 1; break; }
            }
        }
        var kept = probs.AsSpan(0, keep);
        double sum = 0;
        foreach (var p in kept) sum += p;
        var r = random.NextDouble() * sum;
        for (var i = 0; i < keep; i++)
        {
            r -= kept[i];
            if (r <= 0) return order[i];
        }
        return order[keep - 1];
    }
}
