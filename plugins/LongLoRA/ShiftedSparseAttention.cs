using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.LongLoRA;

using F = LoRAHub.TorchExtensions.torchx.nn.functional;

/// <summary>
/// Shifted sparse attention (S²-Attn, LongLoRA §3.2): the sequence splits into groups that attend within themselves
/// (causally); in the second half of the heads the tokens are first shifted by half a group, so those heads' groups
/// straddle the first half's boundaries and information flows between groups. Cost grows with seq × group, not seq².
/// </summary>
/// <remarks>
/// The reference code rolls the shifted heads cyclically, which lets the first half-group of the sequence attend to
/// tokens from its end (the future). Here those tokens attend only among themselves, causally, so the model never
/// sees ahead. Sequences whose length is not a multiple of the group count are padded at the end for the computation
/// (padding after a token is never visible to it).
/// </remarks>
public static class ShiftedSparseAttention
{
    /// <summary>q, k, v: (batch, heads, seq, head_dim) with as many k/v heads as q heads; paddingMask: (batch, seq), true = token.</summary>
    public static Tensor Forward(Tensor q, Tensor k, Tensor v, Tensor? paddingMask, int groups)
    {
        if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4)
            throw new ArgumentException($"S²-Attn takes (batch, heads, seq, head_dim) tensors, got q {Shape(q)}, k {Shape(k)}, v {Shape(v)}");
        if (k.size(1) != q.size(1) || v.size(1) != q.size(1) || k.size(2) != q.size(2))
            throw new ArgumentException($"S²-Attn needs k and v with q's heads and length (no KV cache), got q {Shape(q)}, k {Shape(k)}, v {Shape(v)}");
        long t = q.size(2), heads = q.size(1);
        var padded = (t + groups - 1) / groups * groups;
        if (padded / groups < 2 || heads < 2) return FullCausal(q, k, v, paddingMask);

        using var scope = torch.NewDisposeScope();
        if (padded != t)
        {
            q = PadSequence(q, padded);
            k = PadSequence(k, padded);
            v = PadSequence(v, padded);
            if (paddingMask is not null)
                paddingMask = torch.cat([paddingMask.to(ScalarType.Bool), torch.zeros([paddingMask.size(0), padded - t], ScalarType.Bool, q.device)], 1);
        }
        var groupSize = padded / groups;
        var plainHeads = heads / 2;
        var plain = GroupedAttention(q.narrow(1, 0, plainHeads), k.narrow(1, 0, plainHeads), v.narrow(1, 0, plainHeads), paddingMask, groupSize, shift: 0);
        var shifted = GroupedAttention(q.narrow(1, plainHeads, heads - plainHeads), k.narrow(1, plainHeads, heads - plainHeads),
            v.narrow(1, plainHeads, heads - plainHeads), paddingMask, groupSize, shift: groupSize / 2);
        var y = torch.cat([plain, shifted], 1);
        if (padded != t) y = y.narrow(2, 0, t);
        return y.MoveToOuterDisposeScope();
    }

    // Attention within consecutive groups of `groupSize` tokens after rolling the sequence `shift` tokens to the left.
    private static Tensor GroupedAttention(Tensor q, Tensor k, Tensor v, Tensor? paddingMask, long groupSize, long shift)
    {
        using var scope = torch.NewDisposeScope();
        long b = q.size(0), h = q.size(1), t = q.size(2), d = q.size(3), n = t / groupSize;
        Tensor ToGroups(Tensor x) => (shift > 0 ? x.roll(-shift, 2) : x).reshape(b, h, n, groupSize, d).transpose(1, 2).reshape(b * n, h, groupSize, d);

        Tensor y;
        if (paddingMask is null)
        {
            y = F.scaled_dot_product_attention(ToGroups(q), ToGroups(k), ToGroups(v), is_causal: true);
        }
        else
        {
            var keys = paddingMask.to(ScalarType.Bool);
            if (shift > 0) keys = keys.roll(-shift, 1);
            var keyMask = keys.reshape(b * n, 1, 1, groupSize);
            var allowed = torch.ones([groupSize, groupSize], ScalarType.Bool, q.device).tril().view(1, 1, groupSize, groupSize).logical_and(keyMask);
            if (shift > 0) allowed = allowed.logical_and(NoWrapAround(b, n, groupSize, shift, q.device));
            // A padding query would see no key (NaN); let it see itself. Its output is never used.
            var self = torch.eye(groupSize, dtype: ScalarType.Bool, device: q.device).view(1, 1, groupSize, groupSize).logical_and(keyMask.transpose(2, 3).logical_not());
            y = F.scaled_dot_product_attention(ToGroups(q), ToGroups(k), ToGroups(v), allowed.logical_or(self));
        }
        y = y.reshape(b, n, h, groupSize, d).transpose(1, 2).reshape(b, h, t, d);
        if (shift == 0) return y.MoveToOuterDisposeScope();
        y = y.roll(shift, 2);
        if (paddingMask is null)
        {
            // The first `shift` tokens wrapped into the last group, behind the sequence's end: recompute them causally among themselves.
            var head = F.scaled_dot_product_attention(q.narrow(2, 0, shift), k.narrow(2, 0, shift), v.narrow(2, 0, shift), is_causal: true);
            y = torch.cat([head, y.narrow(2, shift, t - shift)], 2);
        }
        return y.MoveToOuterDisposeScope();
    }

    // (b·n, 1, g, g): false where a wrapped token (the sequence's first `shift`, now at the end of the last group) would see the sequence's end.
    private static Tensor NoWrapAround(long b, long n, long groupSize, long shift, Device device)
    {
        using var scope = torch.NewDisposeScope();
        var rows = torch.arange(0, groupSize, 1, ScalarType.Int64, device).view(groupSize, 1);
        var cols = torch.arange(0, groupSize, 1, ScalarType.Int64, device).view(1, groupSize);
        var firstWrapped = groupSize - shift;
        var leak = rows.ge(firstWrapped).logical_and(cols.lt(firstWrapped));
        var isLast = torch.arange(0, n, 1, ScalarType.Int64, device).eq(n - 1).view(n, 1, 1);
        var blocked = leak.view(1, groupSize, groupSize).logical_and(isLast);
        return blocked.logical_not().unsqueeze(0).expand(b, n, groupSize, groupSize).reshape(b * n, 1, groupSize, groupSize).MoveToOuterDisposeScope();
    }

    /// <summary>Plain causal attention with an optional key-padding mask (used for sequences too short to split).</summary>
    public static Tensor FullCausal(Tensor q, Tensor k, Tensor v, Tensor? paddingMask)
    {
        if (paddingMask is null) return F.scaled_dot_product_attention(q, k, v, is_causal: true);
        using var scope = torch.NewDisposeScope();
        long t = q.size(2);
        var keys = paddingMask.to(ScalarType.Bool).view(paddingMask.size(0), 1, 1, t);
        var allowed = torch.ones([t, t], ScalarType.Bool, q.device).tril().view(1, 1, t, t).logical_and(keys);
        var self = torch.eye(t, dtype: ScalarType.Bool, device: q.device).view(1, 1, t, t).logical_and(keys.transpose(2, 3).logical_not());
        return F.scaled_dot_product_attention(q, k, v, allowed.logical_or(self)).MoveToOuterDisposeScope();
    }

    private static Tensor PadSequence(Tensor x, long length) =>
        torch.cat([x, torch.zeros([x.size(0), x.size(1), length - x.size(2), x.size(3)], x.dtype, x.device)], 2);

    private static string Shape(Tensor x) => "[" + string.Join(", ", x.shape) + "]";
}
