using LoRAHub.TorchExtensions;
using static TorchSharp.torch;

namespace LoRAHub.Models.Llama;

/// <summary>
/// Attention with an explicit mask, for what the fused causal kernel cannot express: a sliding window (query at position
/// p sees keys j with p − W &lt; j ≤ p, transformers' sliding_window_overlay) and Gemma 2's tanh soft-capping of the scores
/// (cap · tanh(scores / cap), before the mask). The KV cache may hold every position: the mask hides those outside the
/// window, so cached and recomputed decoding agree.
/// </summary>
public static class MaskedAttention
{
    /// <summary>
    /// (t, s) bool, true where query i (absolute position s − t + i, its keys being positions 0..s−1) may see key j:
    /// causal, and within the last <paramref name="window"/> positions when one is given.
    /// </summary>
    public static Tensor CausalMask(long t, long s, int? window, Device device)
    {
        using var scope = NewDisposeScope();
        var mask = ones([t, s], ScalarType.Bool, device).tril(s - t);
        if (window is int w) mask = mask.logical_and(ones([t, s], ScalarType.Bool, device).triu(s - t - w + 1));
        return mask.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// (batch, 1, t, t) bool for packed rows: query i sees key j when j ≤ i and both belong to the same example. An
    /// example starts at position 0 of a row and wherever a position id is not its predecessor's + 1 (ids restart at 0).
    /// </summary>
    public static Tensor PackedCausalMask(Tensor positionIds)
    {
        using var scope = NewDisposeScope();
        long t = positionIds.size(1);
        var starts = ones_like(positionIds, ScalarType.Bool);
        if (t > 1) starts[.., 1..] = positionIds.narrow(1, 1, t - 1).ne(positionIds.narrow(1, 0, t - 1) + 1);
        var segment = starts.to(ScalarType.Int32).cumsum(1, ScalarType.Int32);
        var same = segment.unsqueeze(2).eq(segment.unsqueeze(1));
        return same.logical_and(ones([t, t], ScalarType.Bool, positionIds.device).tril()).unsqueeze(1).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// softmax(cap(q·kᵀ·scale) + mask)·v over (batch, heads, seq, head_dim); k/v may have fewer heads (grouped-query).
    /// <paramref name="paddingMask"/> is (batch, s), true/1 for real tokens, or a boolean (batch, 1, t, s) mask (packed
    /// rows: see <see cref="PackedCausalMask"/>), or null.
    /// </summary>
    public static Tensor Forward(Tensor q, Tensor k, Tensor v, Tensor? paddingMask, int? window, double? softcap, double scale)
    {
        using var scope = NewDisposeScope();
        using var noCudnn = torchx.backends.cuda.without_cudnn_sdp(q); // masked shapes vary: no per-shape cuDNN graph builds
        long b = q.size(0), heads = q.size(1), t = q.size(2), s = k.size(2), d = q.size(3);
        var mask = CausalMask(t, s, window, q.device).view(1, 1, t, s);
        if (paddingMask is not null && paddingMask.dim() == 4)
            mask = mask.logical_and(paddingMask); // within an example positions advance with the row, so the window holds
        else if (paddingMask is not null)
        {
            var keys = paddingMask.to(ScalarType.Bool).view(paddingMask.size(0), 1, 1, s);
            // A padding query sees no real key and would give NaN: let it see itself (its diagonal) instead.
            var self = ones([t, s], ScalarType.Bool, q.device).tril(s - t).triu(s - t).view(1, 1, t, s);
            mask = mask.logical_and(keys).logical_or(self.logical_and(keys.logical_not()));
        }
        if (k.size(1) != heads)
        {
            var groups = heads / k.size(1);
            k = k.unsqueeze(2).expand(b, k.size(1), groups, s, d).reshape(b, heads, s, d);
            v = v.unsqueeze(2).expand(b, v.size(1), groups, s, d).reshape(b, heads, s, d);
        }
        if (softcap is null)
            return torchx.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale: scale).MoveToOuterDisposeScope();
        var scores = matmul(q, k.transpose(-2, -1)) * scale;
        scores = (scores / softcap.Value).tanh() * softcap.Value;
        scores = scores.masked_fill(mask.logical_not(), double.NegativeInfinity);
        var probs = nn.functional.softmax(scores.to(ScalarType.Float32), -1).to(q.dtype);
        return matmul(probs, v).MoveToOuterDisposeScope();
    }
}
