using LoRAHub.Models.Llama;

namespace LoRAHub.Models.Tests;

/// <summary>
/// Padding-free packing in the Llama family: an example inside a packed row (positions restarting at 0, block-diagonal
/// causal attention) has the logits it has alone, and a packed batch has the padded batch's loss and gradients.
/// </summary>
public sealed class PackingTests
{
    private static readonly Device Dev = TinyModels.Device;

    private static long[] Tokens(int seed, int length)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, length).Select(_ => (long)rng.Next(1, 64)).ToArray();
    }

    // Rows of examples laid end to end (positions from 0 for each), padded with one more "example" to the width.
    private static (Tensor ids, Tensor positions) PackedRows(long[][][] rows, int width)
    {
        var ids = new long[rows.Length, width];
        var pos = new long[rows.Length, width];
        for (var r = 0; r < rows.Length; r++)
        {
            var at = 0;
            foreach (var e in rows[r].Append(new long[width - rows[r].Sum(e => e.Length)]))
                for (var t = 0; t < e.Length; t++, at++) (ids[r, at], pos[r, at]) = (e[t], t);
        }
        return (tensor(ids, device: Dev), tensor(pos, device: Dev));
    }

    // split: one causal attention call per example (PackedAttention, CUDA's default) or the block-diagonal mask.
    [Theory]
    [InlineData("llama", false)]
    [InlineData("llama", true)]
    [InlineData("gemma2", false)] // sliding-window layers and soft-capped scores: the explicit-mask attention path
    [InlineData("qwen3", true)]
    public void An_example_in_a_packed_row_has_its_logits_alone(string modelType, bool split)
    {
        using var scope = NewDisposeScope();
        using var _ = new SplitMode(split);
        using var model = TinyModels.Llama(modelType, seed: 3);
        model.eval();
        long[][] examples = [Tokens(1, 5), Tokens(2, 7), Tokens(3, 3), Tokens(4, 9), Tokens(5, 4)];
        // Two rows (so the per-row rotary tables are gathered for a batch of rows), padding at the end of the second.
        var (ids, positions) = PackedRows([[examples[0], examples[1], examples[2]], [examples[3], examples[4]]], 15);
        using var noGrad = no_grad();
        var packed = model.ForwardPacked(ids, positions);
        var offsets = new[] { (0, 0), (0, 5), (0, 12), (1, 0), (1, 9) };
        for (var i = 0; i < examples.Length; i++)
        {
            var alone = model.Forward(tensor(examples[i], [1, examples[i].Length], device: Dev));
            var (row, at) = offsets[i];
            var inRow = packed[row].narrow(0, at, examples[i].Length).unsqueeze(0);
            Assert.True(TinyModels.MaxAbsDiff(alone, inRow) < 1e-5, $"{modelType} example {i}: max difference {TinyModels.MaxAbsDiff(alone, inRow)}");
        }
    }

    [Theory]
    [InlineData(false, false)]
    [InlineData(false, true)]
    [InlineData(true, true)]
    public void Packed_loss_and_gradients_equal_the_padded_batch(bool checkpointing, bool split)
    {
        using var scope = NewDisposeScope();
        using var _ = new SplitMode(split);
        using var model = TinyModels.Llama(seed: 4);
        model.train();
        model.GradientCheckpointing = checkpointing;
        long[][] examples = [Tokens(6, 6), Tokens(7, 4), Tokens(8, 9), Tokens(9, 3)];
        // Padded: one example per row, labels -100 on padding and on a "prompt" of 2 tokens per example.
        var padded = new long[4, 9];
        var paddedLabels = new long[4, 9];
        var mask = new long[4, 9];
        for (var r = 0; r < 4; r++)
            for (var t = 0; t < 9; t++)
            {
                var real = t < examples[r].Length;
                padded[r, t] = real ? examples[r][t] : 0;
                paddedLabels[r, t] = real && t >= 2 ? examples[r][t] : -100;
                mask[r, t] = real ? 1 : 0;
            }
        var (ids, positions) = PackedRows([[examples[2]], [examples[0], examples[1]], [examples[3]]], 10);
        // Packed labels: the same prompts masked, and -100 at every example's first token (and on padding).
        var packedLabels = ids.clone();
        packedLabels.masked_fill_(positions.lt(2), -100);
        packedLabels[2, TensorIndex.Slice(3)] = tensor(-100L);
        var loss = model.ComputeLoss(tensor(padded, device: Dev), tensor(paddedLabels, device: Dev), tensor(mask, device: Dev));
        loss.backward();
        var expected = model.parameters().Select(p => p.grad!.clone()).ToList();
        model.zero_grad();
        var packedLoss = model.ComputePackedLoss(ids, packedLabels, positions);
        packedLoss.backward();
        Assert.True(Math.Abs(loss.item<float>() - packedLoss.item<float>()) <= 1e-5 * loss.item<float>(), $"packed {packedLoss.item<float>()} vs padded {loss.item<float>()}");
        var grads = model.parameters().Select(p => p.grad!).ToList();
        for (var i = 0; i < grads.Count; i++)
            Assert.True(TinyModels.MaxAbsDiff(expected[i], grads[i]) < 1e-5, $"parameter {i}: gradient differs by {TinyModels.MaxAbsDiff(expected[i], grads[i])}");
    }

    private sealed class SplitMode : IDisposable
    {
        private readonly bool? before = PackedAttention.SplitByExample;

        public SplitMode(bool split) => PackedAttention.SplitByExample = split;

        public void Dispose() => PackedAttention.SplitByExample = before;
    }

    [Fact]
    public void The_packed_mask_is_block_diagonal_causal_and_its_examples_are_known()
    {
        using var scope = NewDisposeScope();
        var positions = tensor(new long[,] { { 0, 1, 2, 0, 1, 0 } }, device: Dev);
        var mask = MaskedAttention.PackedCausalMask(positions).squeeze(0).squeeze(0).cpu();
        var expected = tensor(new bool[,]
        {
            { true, false, false, false, false, false },
            { true, true, false, false, false, false },
            { true, true, true, false, false, false },
            { false, false, false, true, false, false },
            { false, false, false, true, true, false },
            { false, false, false, false, false, true },
        });
        Assert.True(TinyModels.Equal(mask, expected));
        Assert.Equal([[3L, 2, 1], [1, 4, 1]], PackedAttention.Segments(tensor(new long[,] { { 0, 1, 2, 0, 1, 0 }, { 0, 0, 1, 2, 3, 0 } }, device: Dev)));
    }


    [Fact]
    public void Without_the_models_attention_packing_is_refused_clearly()
    {
        using var scope = NewDisposeScope();
        using var model = TinyModels.Llama(seed: 5);
        Assert.True(model.SupportsPacking);
        model.Attention = (q, k, v, m) => nn.functional.scaled_dot_product_attention(q, k, v, is_casual: true);
        Assert.False(model.SupportsPacking);
        var ids = tensor(new long[,] { { 1, 2, 3, 4 } }, device: Dev);
        var e = Assert.Throws<NotSupportedException>(() => model.ComputePackedLoss(ids, ids, tensor(new long[,] { { 0, 1, 0, 1 } }, device: Dev)));
        Assert.Contains("Packing = false", e.Message);
        model.Attention = LlamaForCausalLM.DefaultAttention;
        Assert.Throws<ArgumentException>(() => model.ComputePackedLoss(ids, ids, tensor(new long[,] { { 0, 1, 2, 7 } }, device: Dev)));
    }
}
