namespace LoRAHub.TorchExtensions.Tests;

using F = torch.nn.functional;
using FX = torchx.nn.functional;

/// <summary>Our ops against explicit computations.</summary>
public class OpsTests
{
    private static readonly Device Dev = TestDevice.Current;

    private static Tensor Reference(Tensor q, Tensor k, Tensor v, bool causal, double scale, Tensor? mask = null)
    {
        var scores = q.matmul(k.transpose(-2, -1)) * scale;
        if (causal)
        {
            var keep = ones([q.size(-2), k.size(-2)], ScalarType.Bool, q.device).tril();
            scores = scores.masked_fill(keep.logical_not(), double.NegativeInfinity);
        }
        if (mask is not null) scores = scores.masked_fill(mask.logical_not(), double.NegativeInfinity);
        return F.softmax(scores, -1).matmul(v);
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void Scaled_mm_equals_the_product_times_alpha(ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(7);
        var a = randn([33, 16], generator: gen).to(dtype).to(Dev);
        var b = randn([16, 20], generator: gen).to(dtype).to(Dev);
        // NaN-free whatever memory the unread addmm input holds: beta 0 never reads it.
        var scaled = torchx.mm(a, b, 0.75);
        Assert.Equal(dtype, scaled.dtype);
        Assert.Equal(new long[] { 33, 20 }, scaled.shape);
        var expected = a.to(ScalarType.Float64).mm(b.to(ScalarType.Float64)).mul(0.75);
        var tol = dtype == ScalarType.Float32 ? 1e-5 : 2e-2;
        Assert.True(scaled.to(ScalarType.Float64).allclose(expected, tol, tol), "alpha·(a @ b)");
        Assert.True(torchx.mm(a, b, 1.0).to(ScalarType.Float64).allclose(a.mm(b).to(ScalarType.Float64), 0, 0), "alpha 1 is mm");
    }

    [Fact]
    public void Foreach_copy_casts_each_tensor_as_copy_does()
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(11);
        // Ten pairs (two launches on CUDA), every cast direction the LoRA blocks use, odd sizes, one non-contiguous source.
        ScalarType[] from = [ScalarType.Float32, ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16, ScalarType.BFloat16,
                             ScalarType.Float32, ScalarType.Float32, ScalarType.Float16, ScalarType.BFloat16, ScalarType.Float32];
        ScalarType[] to = [ScalarType.BFloat16, ScalarType.Float16, ScalarType.Float32, ScalarType.Float32, ScalarType.Float16,
                           ScalarType.Float32, ScalarType.BFloat16, ScalarType.BFloat16, ScalarType.BFloat16, ScalarType.BFloat16];
        var src = from.Select((t, i) => (randn([3 + i, 17], generator: gen) * 100).to(t).to(Dev)).ToArray();
        src[9] = src[9].t();
        var dst = src.Select((t, i) => empty(t.shape, to[i], Dev)).ToArray();
        var before = torchx.ForeachCopyLaunches;
        torchx._foreach_copy_(dst, src);
        for (var i = 0; i < src.Length; i++)
            Assert.True(torch.equal(dst[i], src[i].to(to[i])).all().item<bool>(), $"pair {i}: {from[i]} -> {to[i]}");
        if (Dev.type == DeviceType.CUDA) Assert.Equal(2, torchx.ForeachCopyLaunches - before); // 9 contiguous pairs: 8 + 1
        var cast = torchx._foreach_to([src[0], src[2]], ScalarType.Float32);
        Assert.Equal(ScalarType.Float32, cast[0].dtype);
        Assert.Same(src[2].dtype == ScalarType.Float32 ? src[2] : cast[1], cast[1]);
        Assert.Throws<ArgumentException>(() => torchx._foreach_copy_([dst[0]], [src[1]]));
    }

    [Fact]
    public void Attention_matches_explicit_softmax()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(1);
        var q = randn([1, 2, 5, 4], device: Dev);
        var k = randn([1, 2, 5, 4], device: Dev);
        var v = randn([1, 2, 5, 4], device: Dev);
        Assert.True(FX.scaled_dot_product_attention(q, k, v, is_causal: true).allclose(Reference(q, k, v, true, 0.5), 1e-4, 1e-5));
        Assert.True(FX.scaled_dot_product_attention(q, k, v, scale: 0.2).allclose(Reference(q, k, v, false, 0.2), 1e-4, 1e-5));
    }

    /// <summary>Grouped-query attention equals attention over k and v repeated to the query's heads (repeat_interleave).</summary>
    [Theory]
    [InlineData(true, false)]
    [InlineData(false, false)]
    [InlineData(false, true)]
    public void Grouped_query_attention_matches_repeated_kv(bool causal, bool withMask)
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(2);
        // q as a model makes it: (b, s, h, d) transposed, so its strides are not contiguous.
        var q = randn([2, 6, 8, 4], device: Dev).transpose(1, 2);
        var k = randn([2, 2, 6, 4], device: Dev);
        var v = randn([2, 2, 6, 3], device: Dev);
        var mask = withMask ? rand([2, 8, 6, 6], device: Dev).gt(0.3).logical_or(eye(6, dtype: ScalarType.Bool, device: Dev)) : null;
        var expected = Reference(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), causal, 0.3, mask);
        var (gqa, native) = (FX.Fused.Gqa, NativeGqaAttention.Enabled);
        try
        {
            // Every path: libtorch's own grouped op (the default without a mask), k/v repeated for one SDPA call, and query
            // heads split into groups (Fused.Gqa).
            foreach (var (split, own) in new[] { (false, true), (false, false), (true, false) })
            {
                (FX.Fused.Gqa, NativeGqaAttention.Enabled) = (split, own);
                var calls = NativeGqaAttention.Calls;
                var got = FX.scaled_dot_product_attention(q, k, v, mask, is_causal: causal, scale: 0.3, enable_gqa: true);
                Assert.Equal(new long[] { 2, 8, 6, 3 }, got.shape);
                Assert.True(got.allclose(expected, 1e-4, 1e-5), $"Fused.Gqa = {split}, native = {own}");
                Assert.Equal(own && mask is null ? calls + 1 : calls, NativeGqaAttention.Calls);
            }
        }
        finally
        {
            (FX.Fused.Gqa, NativeGqaAttention.Enabled) = (gqa, native);
        }
        Assert.Throws<ArgumentException>(() => FX.scaled_dot_product_attention(q, randn([2, 3, 6, 4], device: Dev), randn([2, 3, 6, 4], device: Dev), enable_gqa: true));
    }

    // libtorch's own grouped-query op (reached through TorchScript) records autograd as any op: its gradients are those of
    // the repeated k and v summed over each group, and a wrong shape comes back as a .NET exception.
    [Fact]
    public void Native_grouped_query_attention_has_the_gradients_of_the_repeat()
    {
        using var scope = NewDisposeScope();
        Assert.True(FX.scaled_dot_product_attention_takes_gqa, NativeGqaAttention.Failure ?? "switched off");
        torchx.manual_seed(4);
        var q = randn([2, 6, 8, 4], device: Dev).transpose(1, 2).detach().requires_grad_();
        var k = randn([2, 2, 6, 4], device: Dev).requires_grad_();
        var v = randn([2, 2, 6, 4], device: Dev).requires_grad_();
        var dy = randn([2, 8, 6, 4], device: Dev);
        var calls = NativeGqaAttention.Calls;
        var y = FX.scaled_dot_product_attention(q, k, v, is_causal: true, enable_gqa: true);
        Assert.Equal(calls + 1, NativeGqaAttention.Calls);
        var (dq, dk, dv) = Gradients(y);
        var expected = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_casual: true);
        Assert.True(y.allclose(expected, 1e-5, 1e-6));
        var (eq, ek, ev) = Gradients(expected);
        Assert.True(dq.allclose(eq, 1e-5, 1e-6) && dk.allclose(ek, 1e-5, 1e-6) && dv.allclose(ev, 1e-5, 1e-6));
        Assert.ThrowsAny<Exception>(() => NativeGqaAttention.TryAttend(q, randn([2, 3, 6, 4], device: Dev), randn([2, 3, 6, 4], device: Dev), causal: true));

        (Tensor, Tensor, Tensor) Gradients(Tensor output)
        {
            var grads = autograd.grad([output], [q, k, v], [dy]);
            return (grads[0], grads[1], grads[2]);
        }
    }

    [Fact]
    public void Grouped_query_attention_in_bf16_on_the_fused_path()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(3);
        var q = randn([1, 8, 128, 64], ScalarType.BFloat16, Dev).requires_grad_();
        var k = randn([1, 2, 128, 64], ScalarType.BFloat16, Dev).requires_grad_();
        var v = randn([1, 2, 128, 64], ScalarType.BFloat16, Dev).requires_grad_();
        var got = FX.scaled_dot_product_attention(q, k, v, is_causal: true, enable_gqa: true);
        var expected = F.scaled_dot_product_attention(q.@float(), k.@float().repeat_interleave(4, 1), v.@float().repeat_interleave(4, 1), is_casual: true);
        Assert.True(got.@float().allclose(expected, 2e-2, 2e-2));
        got.@float().sum().backward();
        Assert.Equal(k.shape, k.grad!.shape);
        Assert.True(k.grad!.isfinite().all().item<bool>());
    }

    [Fact]
    public void Dtypes_round_trip_through_buffers()
    {
        using var scope = NewDisposeScope();
        foreach (var type in new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16, ScalarType.Int64, ScalarType.Int32, ScalarType.Byte, ScalarType.Bool, ScalarType.Float64, ScalarType.Int8, ScalarType.Int16 })
        {
            var t = tensor(new float[] { 0, 1, 2, 3 }, device: Dev).to(type);
            using var stream = new MemoryStream();
            torchx.write_bytes(t, stream);
            Assert.Equal(t.numel() * t.element_size(), stream.Length);
            var back = torchx.frombuffer(stream.ToArray(), [4], type, Dev);
            Assert.Equal(Dev.type, back.device_type);
            Assert.True(back.eq(t).all().item<bool>(), $"round trip of {type}");
        }
    }

    public static TheoryData<long[], long[]> MatmulShapes => new()
    {
        { [3], [3] }, { [2, 3], [3] }, { [3], [3, 4] }, { [2, 3], [3, 4] }, { [5, 2, 3], [3] }, { [5, 2, 3], [3, 4] },
        { [3], [5, 3, 4] }, { [2, 3], [5, 3, 4] }, { [5, 2, 3], [5, 3, 4] }, { [6, 1, 2, 3], [5, 3, 4] },
    };

    /// <summary>torchx.matmul (the catching path) equals Tensor.matmul, values and gradients, for every rank combination.</summary>
    [Theory]
    [MemberData(nameof(MatmulShapes))]
    public void Matmul_equals_TorchSharp_s_for_every_rank_combination(long[] sa, long[] sb)
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(7);
        var a = randn(sa, ScalarType.Float64, Dev).requires_grad_();
        var b = randn(sb, ScalarType.Float64, Dev).requires_grad_();
        var expected = a.matmul(b);
        var got = torchx.matmul(a, b);
        Assert.Equal(expected.shape, got.shape);
        Assert.True(got.allclose(expected, 1e-12, 1e-12));
        var w = randn(expected.shape, ScalarType.Float64, Dev);
        var (ga, gb) = (torch.autograd.grad([(expected * w).sum()], [a, b]), torch.autograd.grad([(got * w).sum()], [a, b]));
        Assert.True(ga[0].allclose(gb[0], 1e-12, 1e-12) && ga[1].allclose(gb[1], 1e-12, 1e-12));
    }
}
