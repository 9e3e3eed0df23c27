namespace LoRAHub.LongLoRA.Tests;

using F = torch.nn.functional;

/// <summary>S²-Attn against attention with an explicit mask built from the paper's rule, and causality.</summary>
public sealed class ShiftedSparseAttentionTests
{
    private static readonly Device Dev = new Device(Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") ?? "cpu");

    // Which keys query i may see: within its group, causally; the shifted heads' groups start half a group later, and
    // the first half-group (which the shift wraps to the end) sees only itself.
    private static bool Allowed(long i, long j, long t, long g, bool shifted)
    {
        if (j > i) return false;
        if (!shifted) return i / g == j / g;
        var s = g / 2;
        if (i < s) return j < s;
        return (i - s) / g == (j - s) / g && j >= s;
    }

    private static Tensor Reference(Tensor q, Tensor k, Tensor v, long g)
    {
        long h = q.size(1), t = q.size(2), plain = h / 2;
        Tensor Mask(bool shifted)
        {
            var m = new float[t * t];
            for (long i = 0; i < t; i++)
                for (long j = 0; j < t; j++) m[i * t + j] = Allowed(i, j, t, g, shifted) ? 1 : 0;
            return torch.tensor(m, [t, t], device: Dev).gt(0.5);
        }
        var a = F.scaled_dot_product_attention(q.narrow(1, 0, plain), k.narrow(1, 0, plain), v.narrow(1, 0, plain), Mask(false));
        var b = F.scaled_dot_product_attention(q.narrow(1, plain, h - plain), k.narrow(1, plain, h - plain), v.narrow(1, plain, h - plain), Mask(true));
        return torch.cat([a, b], 1);
    }

    private static (Tensor q, Tensor k, Tensor v) Inputs(long b, long h, long t, long d, long seed)
    {
        torchx.manual_seed(seed);
        return (torch.randn([b, h, t, d], device: Dev), torch.randn([b, h, t, d], device: Dev), torch.randn([b, h, t, d], device: Dev));
    }

    [Theory]
    [InlineData(16, 4)]   // 4 groups of 4
    [InlineData(24, 4)]   // 4 groups of 6
    [InlineData(16, 2)]   // 2 groups of 8
    public void Equals_attention_with_the_grouped_shifted_mask(int t, int groups)
    {
        using var scope = torch.NewDisposeScope();
        var (q, k, v) = Inputs(2, 4, t, 8, seed: t + groups);
        var ours = ShiftedSparseAttention.Forward(q, k, v, null, groups);
        var expected = Reference(q, k, v, t / groups);
        Assert.True(ours.allclose(expected, 1e-4, 1e-5), $"max diff {(ours - expected).abs().max().item<float>()}");
        // Not full attention: grouping changes the result beyond the first group.
        Assert.False(ours.allclose(F.scaled_dot_product_attention(q, k, v, is_casual: true), 1e-3, 1e-3));
    }

    [Fact]
    public void An_all_true_padding_mask_gives_the_same_result_as_none()
    {
        using var scope = torch.NewDisposeScope();
        var (q, k, v) = Inputs(2, 4, 16, 8, seed: 3);
        var mask = torch.ones([2, 16], ScalarType.Bool, Dev);
        var masked = ShiftedSparseAttention.Forward(q, k, v, mask, 4);
        var plain = ShiftedSparseAttention.Forward(q, k, v, null, 4);
        Assert.True(masked.allclose(plain, 1e-4, 1e-5), $"max diff {(masked - plain).abs().max().item<float>()}");
    }

    [Fact]
    public void Right_padding_does_not_change_the_real_tokens()
    {
        using var scope = torch.NewDisposeScope();
        var (q, k, v) = Inputs(2, 4, 16, 8, seed: 4);
        // 12 real tokens then padding: the padding comes after every real token, so they never see it and their
        // outputs equal the unmasked computation's (which goes through the fused causal kernel instead of a mask).
        var mask = torch.tensor(Enumerable.Range(0, 32).Select(i => i % 16 < 12).ToArray(), [2, 16], device: Dev);
        var masked = ShiftedSparseAttention.Forward(q, k, v, mask, 4);
        var plain = ShiftedSparseAttention.Forward(q, k, v, null, 4);
        Assert.False(masked.isnan().any().item<bool>());
        Assert.True(masked.narrow(2, 0, 12).allclose(plain.narrow(2, 0, 12), 1e-4, 1e-5),
            $"max diff {(masked.narrow(2, 0, 12) - plain.narrow(2, 0, 12)).abs().max().item<float>()}");
    }

    [Theory]
    [InlineData(16)]
    [InlineData(13)] // not a multiple of the group count: padded internally
    public void No_token_sees_the_future(int t)
    {
        using var scope = torch.NewDisposeScope();
        var (q, k, v) = Inputs(1, 4, t, 8, seed: 5);
        var before = ShiftedSparseAttention.Forward(q, k, v, null, 4);
        for (var i = 0; i < t - 1; i++)
        {
            // Change every key and value after position i: outputs up to i must not move.
            var keep = torch.arange(0, t, 1, ScalarType.Int64, Dev).le(i).view(1, 1, t, 1).to(ScalarType.Float32);
            var k2 = k * keep + (1 - keep) * torch.randn([1, 4, t, 8], device: Dev);
            var v2 = v * keep + (1 - keep) * torch.randn([1, 4, t, 8], device: Dev);
            var after = ShiftedSparseAttention.Forward(q, k2, v2, null, 4);
            Assert.True(after.narrow(2, 0, i + 1).allclose(before.narrow(2, 0, i + 1), 1e-5, 1e-6), $"position ≤ {i} changed when the future changed");
        }
    }

    [Fact]
    public void Gradients_equal_the_reference_gradients()
    {
        using var scope = torch.NewDisposeScope();
        var (q, k, v) = Inputs(1, 4, 16, 8, seed: 6);
        Tensor[] Grads(Func<Tensor, Tensor, Tensor, Tensor> attention)
        {
            var (q1, k1, v1) = (q.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_());
            attention(q1, k1, v1).pow(2).sum().backward();
            return [q1.grad!, k1.grad!, v1.grad!];
        }
        var ours = Grads((a, b, c) => ShiftedSparseAttention.Forward(a, b, c, null, 4));
        var expected = Grads((a, b, c) => Reference(a, b, c, 4));
        for (var i = 0; i < 3; i++)
        {
            Assert.True(ours[i].abs().sum().item<float>() > 0);
            Assert.True(ours[i].allclose(expected[i], 1e-4, 1e-5), $"gradient {i}: max diff {(ours[i] - expected[i]).abs().max().item<float>()}");
        }
    }

    [Fact]
    public void Mismatched_heads_are_reported()
    {
        using var scope = torch.NewDisposeScope();
        var q = torch.randn([1, 4, 16, 8], device: Dev);
        var kv = torch.randn([1, 2, 16, 8], device: Dev);
        var e = Assert.Throws<ArgumentException>(() => ShiftedSparseAttention.Forward(q, kv, kv, null, 4));
        Assert.Contains("heads", e.Message);
    }
}
