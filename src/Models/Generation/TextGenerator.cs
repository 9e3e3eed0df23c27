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
        if (prompts.Count == 0) return [];
        if (prompts.Any(p => p.Length == 0)) throw new ArgumentException("every prompt needs at least one token (e.g. bos)");
        var batch = prompts.Count;
        var longest = prompts.Max(p => p.Length);
        var padded = new long[batch * longest];
        var mask = new long[batch * longest];
        for (var b = 0; b < batch; b++)
        {
            var offset = longest - prompts[b].Length;
            for (var i = 0; i < longest; i++)
            {
                padded[b * longest + i] = i < offset ? options.PadTokenId : prompts[b][i - offset];
                mask[b * longest + i] = i < offset ? 0 : 1;
            }
        }

        var random = new Random(options.Seed);
        var outputs = Enumerable.Range(0, batch).Select(_ => new List<int>()).ToArray();
        var finished = new bool[batch];
        var wasTraining = model.Root.training;
        model.Root.eval();
        try
        {
            Decode(model, padded, mask, batch, longest, options, random, outputs, finished);
        }
        finally
        {
            if (wasTraining) model.Root.train();
        }
        return outputs.Select(o => o.ToArray()).ToArray();
    }

    private static void Decode(ICausalLanguageModel model, long[] padded, long[] mask, int batch, int longest, GenerationOptions options,
        Random random, List<int>[] outputs, bool[] finished)
    {
        var device = model.Device;
        using var noGrad = no_grad();
        using var cache = options.UseCache ? new KvCache(model.LayerCount) : null;
        using var scope = NewDisposeScope();
        var sequence = tensor(padded, [batch, longest], device: device);
        var attention = tensor(mask, [batch, longest], device: device);
        var input = sequence;
        for (var step = 0; step < options.MaxNewTokens && !finished.All(f => f); step++)
        {
            using var stepScope = NewDisposeScope();
            var logits = model.Forward(input, attention, cache);
            var last = logits.select(1, logits.size(1) - 1).to(ScalarType.Float32).contiguous();
            var next = Choose(last, options, random);
            for (var b = 0; b < batch; b++)
            {
                if (finished[b])
                {
                    next[b] = options.PadTokenId;
                    continue;
                }
                outputs[b].Add((int)next[b]);
                if (options.StopTokenIds.Contains((int)next[b])) finished[b] = true;
            }
            var nextTensor = tensor(next, [batch, 1], device: device);
            var ones = torch.ones([batch, 1], ScalarType.Int64, device);
            // The grown tensors outlive this step; the ones they replace are freed now.
            var (oldAttention, oldSequence, oldInput) = (attention, sequence, input);
            attention = cat([attention, ones], 1).MoveToOuterDisposeScope();
            sequence = cat([sequence, nextTensor], 1).MoveToOuterDisposeScope();
            input = options.UseCache ? nextTensor.MoveToOuterDisposeScope() : sequence;
            if (!ReferenceEquals(oldInput, oldSequence)) oldInput.Dispose();
            oldAttention.Dispose();
            oldSequence.Dispose();
        }
    }

    /// <summary>Next token per row from fp32 logits (batch, vocab).</summary>
    private static long[] Choose(Tensor logits, GenerationOptions options, Random random)
    {
        if (options.Temperature <= 0) return logits.argmax(-1).data<long>().ToArray();
        var batch = (int)logits.size(0);
        var vocab = (int)logits.size(1);
        var all = logits.data<float>().ToArray();
        var result = new long[batch];
        for (var b = 0; b < batch; b++)
            result[b] = Sample(all.AsSpan(b * vocab, vocab), options, random);
        return result;
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
