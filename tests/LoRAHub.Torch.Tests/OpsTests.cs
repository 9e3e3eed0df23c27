namespace LoRAHub.Torch.Tests;

using F = torch.nn.functional;

/// <summary>Op results against hand-computed values.</summary>
public class OpsTests
{
    private static readonly Device Dev = TestDevice.Current;

    private static Tensor T(float[] values, params long[] shape) => torch.tensor(values, shape.Length == 0 ? [values.Length] : shape, Dev);

    private static void Close(float[] expected, Tensor actual, float tol = 1e-5f)
    {
        var got = actual.cpu().to(ScalarType.Float32).data<float>();
        Assert.Equal(expected.Length, got.Length);
        for (var i = 0; i < got.Length; i++)
            Assert.True(Math.Abs(expected[i] - got[i]) <= tol * Math.Max(1, Math.Abs(expected[i])), $"element {i}: expected {expected[i]}, got {got[i]}");
    }

    [Fact]
    public void Arithmetic_and_broadcasting()
    {
        using var scope = torch.NewDisposeScope();
        var a = T([1, 2, 3, 4, 5, 6], 2, 3);
        var b = T([10, 20, 30], 3);
        Close([11, 22, 33, 14, 25, 36], a + b);
        Close([-9, -18, -27, -6, -15, -24], a - b);
        Close([2, 4, 6, 8, 10, 12], a * 2);
        Close([0.5f, 1, 1.5f, 2, 2.5f, 3], a / 2);
        Close([9, 8, 7, 6, 5, 4], 10 - a);
        Close([1, 4, 9, 16, 25, 36], a.pow(2));
        Close([-1, -2, -3, -4, -5, -6], -a);
        Assert.Equal(new long[] { 2, 3 }, (a + b).shape);
    }

    [Fact]
    public void Matmul_and_linear()
    {
        using var scope = torch.NewDisposeScope();
        var a = T([1, 2, 3, 4], 2, 2);
        var b = T([5, 6, 7, 8], 2, 2);
        Close([19, 22, 43, 50], a.matmul(b));
        var bias = T([1, -1]);
        // linear(x, W, b) = x Wᵀ + b
        Close([1 * 5 + 2 * 6 + 1, 1 * 7 + 2 * 8 - 1, 3 * 5 + 4 * 6 + 1, 3 * 7 + 4 * 8 - 1], F.linear(a, b, bias));
    }

    [Fact]
    public void Reductions()
    {
        using var scope = torch.NewDisposeScope();
        var a = T([1, 2, 3, 4, 5, 6], 2, 3);
        Assert.Equal(21f, a.sum().item<float>());
        Assert.Equal(3.5f, a.mean().item<float>());
        Close([5, 7, 9], a.sum(0));
        Close([2, 5], a.mean(1));
        Close([3, 6], a.amax(1));
        Assert.Equal(new long[] { 2, 1 }, a.sum(1, keepdim: true).shape);
        Assert.Equal(5L, a.argmax().item<long>());
        var (values, idx) = a.max(1);
        Close([3, 6], values);
        Assert.Equal(new long[] { 2, 2 }, idx.cpu().data<long>());
        Assert.Equal(MathF.Sqrt(91), a.norm().item<float>(), 4);
    }

    [Fact]
    public void Views_slicing_and_indexing()
    {
        using var scope = torch.NewDisposeScope();
        var a = torch.arange(12, ScalarType.Float32, Dev).view(3, 4);
        Close([4, 5, 6, 7], a[1]);
        Close([1, 5, 9], a[.., 1]);
        Close([6, 7, 10, 11], a[1.., 2..]);
        Close([8, 9, 10, 11], a[^1]);
        Close([0, 2], a[0, TensorIndex.Slice(0, 4, 2)]);
        Assert.Equal(new long[] { 1, 3, 4 }, a[TensorIndex.None].shape);
        Assert.Equal(new long[] { 3 }, a[TensorIndex.Ellipsis, 0].shape);
        Close([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11], a.t().contiguous());
        Assert.Equal(new long[] { 4, 3 }, a.transpose(0, 1).shape);
        Assert.Equal(new long[] { 3, 1, 4 }, a.unsqueeze(1).shape);
        Close([4, 5, 6, 7, 8, 9, 10, 11], a.narrow(0, 1, 2));
        var idx = torch.tensor(new long[] { 2, 0 }, device: Dev);
        Close([8, 9, 10, 11, 0, 1, 2, 3], a.index_select(0, idx));
        Close([8, 9, 10, 11, 0, 1, 2, 3], a[idx]);
        var mask = a.gt(9);
        Close([10, 11], a[mask]);
        Assert.Equal(a.StorageId, a[1].StorageId);
    }

    [Fact]
    public void Cat_stack_chunk_split()
    {
        using var scope = torch.NewDisposeScope();
        var a = T([1, 2]);
        var b = T([3, 4]);
        Close([1, 2, 3, 4], torch.cat([a, b]));
        Assert.Equal(new long[] { 2, 2 }, torch.stack([a, b]).shape);
        var x = torch.arange(10, ScalarType.Float32, Dev);
        var chunks = x.chunk(3);
        Assert.Equal(3, chunks.Length);
        Close([0, 1, 2, 3], chunks[0]);
        Close([8, 9], chunks[2]);
        var parts = x.split([3, 7]);
        Close([0, 1, 2], parts[0]);
        Assert.Equal(7, parts[1].numel());
        Assert.Equal(4, x.split(3).Length);
    }

    [Fact]
    public void Softmax_log_softmax_and_cross_entropy_with_ignore_index()
    {
        using var scope = torch.NewDisposeScope();
        var logits = T([1, 2, 3, 1, 1, 1], 2, 3);
        var e = new[] { MathF.Exp(1), MathF.Exp(2), MathF.Exp(3) };
        var z = e.Sum();
        Close([e[0] / z, e[1] / z, e[2] / z, 1 / 3f, 1 / 3f, 1 / 3f], F.softmax(logits, -1));
        Close([MathF.Log(e[0] / z), MathF.Log(e[1] / z), MathF.Log(e[2] / z)], F.log_softmax(logits, -1)[0]);
        var target = torch.tensor(new long[] { 2, 0 }, device: Dev);
        var expected = (-MathF.Log(e[2] / z) + MathF.Log(3)) / 2;
        Assert.Equal(expected, F.cross_entropy(logits, target).item<float>(), 5);
        var ignored = torch.tensor(new long[] { 2, -100 }, device: Dev);
        Assert.Equal(-MathF.Log(e[2] / z), F.cross_entropy(logits, ignored).item<float>(), 5);
    }

    [Fact]
    public void Activations_and_norms()
    {
        using var scope = torch.NewDisposeScope();
        var x = T([-1, 0, 2]);
        static float Sig(float v) => 1 / (1 + MathF.Exp(-v));
        Close([-1 * Sig(-1), 0, 2 * Sig(2)], x.silu());
        Close([-0.15865525f, 0, 1.9544997f], x.gelu());
        var h = T([3, 4], 1, 2);
        var rms = MathF.Sqrt((9 + 16) / 2f + 1e-6f);
        Close([3 / rms, 4 / rms], F.rms_norm(h, null, 1e-6));
        Close([-1, 1], F.layer_norm(h, [2], null, null, 0), 1e-4f);
        var w = T([0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f], 3, 2);
        Close([0.5f, 0.6f, 0.1f, 0.2f], F.embedding(torch.tensor(new long[] { 2, 0 }, device: Dev), w));
    }

    [Fact]
    public void Attention_matches_explicit_softmax()
    {
        using var scope = torch.NewDisposeScope();
        torch.manual_seed(1);
        var q = torch.randn([1, 2, 5, 4], device: Dev);
        var k = torch.randn([1, 2, 5, 4], device: Dev);
        var v = torch.randn([1, 2, 5, 4], device: Dev);
        var fused = F.scaled_dot_product_attention(q, k, v, is_causal: true);
        var scores = q.matmul(k.transpose(-2, -1)) / 2.0;
        var causal = torch.ones([5, 5], ScalarType.Bool, Dev).tril();
        var reference = F.softmax(scores.masked_fill(causal.logical_not(), double.NegativeInfinity), -1).matmul(v);
        Assert.True(fused.allclose(reference, 1e-4, 1e-5));
    }

    [Fact]
    public void Dtypes_round_trip_through_buffers()
    {
        using var scope = torch.NewDisposeScope();
        foreach (var type in new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16, ScalarType.Int64, ScalarType.Int32, ScalarType.Byte, ScalarType.Bool, ScalarType.Float64, ScalarType.Int8, ScalarType.Int16 })
        {
            var t = T([0, 1, 2, 3]).to(type);
            Assert.Equal(type, t.dtype);
            var bytes = new byte[t.numel() * t.element_size()];
            t.CopyTo(bytes);
            var back = torch.frombuffer(bytes, [4], type, Dev);
            Assert.True(back.equal(t), $"round trip of {type}");
        }
        Assert.Equal(new[] { 1L, 2L }, torch.tensor(new long[] { 1, 2 }).data<long>());
        Assert.Equal((Half)1.5, torch.tensor(new[] { (Half)1.5 }).data<Half>()[0]);
    }

    [Fact]
    public void Seeded_random_is_reproducible()
    {
        using var scope = torch.NewDisposeScope();
        torch.manual_seed(42);
        var a = torch.randn([8], device: Dev).cpu().data<float>();
        torch.manual_seed(42);
        var b = torch.randn([8], device: Dev).cpu().data<float>();
        Assert.Equal(a, b);
        var state = torch.get_rng_state();
        var c = torch.rand([4]).data<float>();
        torch.set_rng_state(state);
        Assert.Equal(c, torch.rand([4]).data<float>());
    }
}
