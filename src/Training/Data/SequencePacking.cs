using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Training.Data;

/// <summary>
/// Padding-free packing of one batch: its examples (right-padded rows) are placed end to end in as few rows as fit,
/// no row longer than the batch's longest example, each example with its own positions from 0 (<see cref="Batch.PositionIds"/>)
/// and its first token's label set to -100 (it is not predicted from the previous example's last token). With a model
/// whose attention stays within an example (block-diagonal causal) every example's loss is the one it has alone, and
/// the batch has the same target tokens, so a packed step equals the padded step; it only computes fewer padding tokens.
/// The batch's examples and order of reading are unchanged, so loader positions, resume and data-parallel slicing are too.
/// </summary>
public static class SequencePacking
{
    /// <summary>
    /// First-fit decreasing: examples by length (longest first, ties by index), each into the first row with room for it;
    /// a row holds at most <paramref name="capacity"/> tokens. Deterministic. Returns the example indices of each row.
    /// </summary>
    public static List<List<int>> Plan(IReadOnlyList<int> lengths, int capacity)
    {
        var order = Enumerable.Range(0, lengths.Count).OrderByDescending(i => lengths[i]).ThenBy(i => i);
        var rows = new List<List<int>>();
        var fill = new List<int>();
        foreach (var i in order)
        {
            if (lengths[i] > capacity) throw new ArgumentException($"example {i} has {lengths[i]} tokens, more than a packed row's capacity {capacity}");
            var row = fill.FindIndex(f => f + lengths[i] <= capacity);
            if (row < 0)
            {
                rows.Add([]);
                fill.Add(0);
                row = rows.Count - 1;
            }
            rows[row].Add(i);
            fill[row] += lengths[i];
        }
        return rows;
    }

    /// <summary>
    /// The packed form of a right-padded batch (AttentionMask 1 on real tokens), on the batch's device, or null when the
    /// batch has no padding (then causal attention needs no mask at all). A batch that packing shortens by no row is
    /// still packed: its attention then splits by example (flash on CUDA) instead of taking a padding mask. The packed
    /// batch's AttentionMask marks real tokens (padding at the end of a row is one more example, with labels -100);
    /// Tokens are the same, LabelTokens count the labels left after the examples' first tokens are masked (the batch's
    /// target tokens).
    /// </summary>
    public static Batch? Pack(Batch batch)
    {
        using var scope = NewDisposeScope();
        long rows = batch.InputIds.size(0), width = batch.InputIds.size(1);
        using var hostMask = batch.AttentionMask.cpu();
        using var hostIds = batch.InputIds.cpu();
        using var hostLabels = batch.Labels.cpu();
        var mask = hostMask.data<long>().ToArray();
        var lengths = Enumerable.Range(0, (int)rows).Select(r => (int)mask.Skip(r * (int)width).Take((int)width).Sum()).ToArray();
        if (lengths.All(l => l == width)) return null;
        var plan = Plan(lengths, Math.Max(1, lengths.Max()));
        var packedWidth = plan.Max(row => row.Sum(i => lengths[i]));
        var ids = hostIds.data<long>().ToArray();
        var labels = hostLabels.data<long>().ToArray();
        var n = plan.Count * packedWidth;
        var (pIds, pLabels, pMask, pPos) = (new long[n], new long[n], new long[n], new long[n]);
        Array.Fill(pLabels, TokenizedExample.IgnoreIndex);
        var labelTokens = 0;
        for (var r = 0; r < plan.Count; r++)
        {
            var at = r * packedWidth;
            foreach (var e in plan[r])
            {
                for (var t = 0; t < lengths[e]; t++)
                {
                    pIds[at + t] = ids[e * width + t];
                    pLabels[at + t] = t == 0 ? TokenizedExample.IgnoreIndex : labels[e * width + t];
                    pMask[at + t] = 1;
                    pPos[at + t] = t;
                    if (t > 0 && labels[e * width + t] != TokenizedExample.IgnoreIndex) labelTokens++;
                }
                at += lengths[e];
            }
            // The rest of the row is padding: one more example of its own (positions from 0, no labels).
            for (var t = at; t < (r + 1) * packedWidth; t++) pPos[t] = t - at;
        }
        long[] shape = [plan.Count, packedWidth];
        var device = batch.InputIds.device;
        return new Batch
        {
            InputIds = tensor(pIds, shape, device: device).DetachFromDisposeScope(),
            Labels = tensor(pLabels, shape, device: device).DetachFromDisposeScope(),
            AttentionMask = tensor(pMask, shape, device: device).DetachFromDisposeScope(),
            PositionIds = tensor(pPos, shape, device: device).DetachFromDisposeScope(),
            Tokens = batch.Tokens,
            LabelTokens = labelTokens,
        };
    }
}
