using TorchSharp.Modules;

namespace LoRAHub.TorchExtensions.Tests;

using F = torch.nn.functional;
using FX = torchx.nn.functional;

/// <summary>Our differentiable functions: autograd's gradient against central finite differences (float64).</summary>
/// <remarks>Serial: the checkpoint tests rely on the CPU generator's sequence, which parallel tests would advance.</remarks>
[Collection(Serial.Name)]
public class AutogradTests
{
    private static readonly Device Dev = TestDevice.Current;

    /// <summary>Checks d(sum(f(x) * w))/dx for a random weighting w, one input element at a time.</summary>
    internal static void CheckGradient(Func<Tensor, Tensor> f, long[] shape, double lo = -1, double hi = 1, int seed = 0)
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(seed);
        var x = (rand(shape, ScalarType.Float64, Dev) * (hi - lo) + lo).detach().requires_grad_();
        Tensor w;
        using (no_grad())
        {
            using var probe = f(x);
            w = randn(probe.shape, ScalarType.Float64, Dev);
        }
        var y = (f(x) * w).sum();
        y.backward();
        var analytic = x.grad!.cpu().data<double>().ToArray();

        var values = x.detach().cpu().data<double>().ToArray();
        const double h = 1e-6;
        double Eval(double[] v)
        {
            using var inner = NewDisposeScope();
            using var _ = no_grad();
            var xt = tensor(v, shape, device: Dev);
            return (f(xt) * w).sum().item<double>();
        }
        for (var i = 0; i < values.Length; i++)
        {
            var plus = (double[])values.Clone();
            var minus = (double[])values.Clone();
            plus[i] += h;
            minus[i] -= h;
            var numeric = (Eval(plus) - Eval(minus)) / (2 * h);
            Assert.True(Math.Abs(numeric - analytic[i]) <= 1e-5 + 1e-4 * Math.Abs(numeric),
                $"element {i}: finite difference {numeric}, autograd {analytic[i]}");
        }
    }

    [Fact]
    public void Chunked_cross_entropy_matches_full_logits_and_its_gradients()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(3);
        var labels = tensor(new long[] { 1, -100, 4, 0, 2, 3, -100 }, device: Dev);
        var weight = randn([5, 4], ScalarType.Float64, Dev);
        var hidden = randn([7, 4], ScalarType.Float64, Dev);
        var full = F.cross_entropy(F.linear(hidden, weight), labels);
        var chunked = FX.chunked_cross_entropy(hidden, weight, labels, chunk_size: 3);
        Assert.Equal(full.item<double>(), chunked.item<double>(), 5);
        CheckGradient(h => FX.chunked_cross_entropy(h, weight, labels, chunk_size: 2), [7, 4]);
        CheckGradient(w => FX.chunked_cross_entropy(hidden, w, labels, chunk_size: 4), [5, 4]);
    }

    [Fact]
    public void Chunked_cross_entropy_in_bf16_keeps_fp32_logits_and_rejects_bad_shapes()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(4);
        var labels = tensor(new long[] { 1, 4, 0, 2, 3, -100 }, device: Dev);
        var weight = randn([5, 8], ScalarType.Float32, Dev);
        var hidden = randn([6, 8], ScalarType.Float32, Dev);
        var reference = F.cross_entropy(F.linear(hidden.bfloat16(), weight.bfloat16()).@float(), labels).item<float>();
        var h = hidden.bfloat16().requires_grad_();
        var loss = FX.chunked_cross_entropy(h, weight.bfloat16(), labels, chunk_size: 4);
        Assert.Equal(ScalarType.Float32, loss.dtype);
        Assert.Equal(reference, loss.item<float>(), 2);
        loss.backward();
        Assert.Equal(ScalarType.BFloat16, h.grad!.dtype);
        Assert.Equal(0f, h.grad![5].abs().sum().@float().item<float>()); // ignored row
        Assert.Throws<ArgumentException>(() => FX.chunked_cross_entropy(hidden, randn([5, 7], device: Dev), labels));
        Assert.Throws<ArgumentException>(() => FX.chunked_cross_entropy(hidden, weight, labels[..3]));
    }

    [Fact]
    public void Checkpoint_gives_the_same_values_and_gradients()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(5);
        var w = randn([4, 4], ScalarType.Float64, Dev).requires_grad_();
        Tensor Block(Tensor x) => F.dropout(F.linear(x, w).tanh(), 0.3, true) + x;
        var input = randn([3, 4], ScalarType.Float64, Dev);

        torchx.manual_seed(9);
        var plain = Block(input).pow(2).sum();
        plain.backward();
        var expectedGrad = w.grad!.clone();
        w.grad = null;

        torchx.manual_seed(9);
        var checkpointed = torchx.utils.checkpoint(Block, input).pow(2).sum();
        if (!TestDevice.IsCuda) // on CUDA the checkpoint reseeds the generator: another (reproducible) mask, see below
        {
            Assert.Equal(plain.item<double>(), checkpointed.item<double>(), 10);
            checkpointed.backward();
            Assert.True(w.grad!.allclose(expectedGrad, 1e-10, 1e-12), "parameter gradients through recomputation (same dropout mask)");
        }

        // Input gradients flow through too.
        CheckGradient(x => torchx.utils.checkpoint(t => F.linear(t, w.detach()).tanh(), x), [3, 4]);
        var e = Assert.Throws<TorchException>(() => torchx.utils.checkpoint(_ => throw new InvalidOperationException("boom"), input));
        Assert.Contains("boom", e.Message);
    }

    /// <summary>
    /// Dropout inside the checkpoint: the recomputation must draw the same mask as the forward (CPU and CUDA generators),
    /// so d out / d x is exactly mask / (1 − p), read off the forward's output.
    /// </summary>
    [Fact]
    public void Checkpoint_recomputes_the_same_dropout_mask()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(11);
        var x = ones([64, 64], ScalarType.Float32, Dev).requires_grad_();
        var y = torchx.utils.checkpoint(t => F.dropout(t * 1.0, 0.5, true), x);
        var kept = y.detach().ne(0).to(ScalarType.Float32);
        Assert.InRange(kept.mean().item<float>(), 0.3f, 0.7f);
        // Draw random numbers between forward and backward: the recomputation must not see them.
        _ = rand([1000], device: Dev).sum().item<float>();
        y.sum().backward();
        Assert.True(x.grad!.allclose(kept * 2.0), "backward recomputed a different dropout mask");
        // CPU: the generator continues after forward and backward exactly as after the plain function.
        if (!TestDevice.IsCuda)
        {
            torchx.manual_seed(12);
            _ = F.dropout(ones([8]), 0.5, true);
            var afterPlain = rand([4]).data<float>().ToArray();
            torchx.manual_seed(12);
            var z = torchx.utils.checkpoint(t => F.dropout(t * 1.0, 0.5, true), ones([8], requires_grad: true));
            z.sum().backward();
            Assert.Equal(afterPlain, rand([4]).data<float>().ToArray());
        }
    }

    [Fact]
    public void Checkpoint_gives_parameters_inside_a_module_their_gradients()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(2);
        var layer = nn.Linear(6, 6, dtype: ScalarType.Float64, device: Dev);
        var x = randn([5, 6], ScalarType.Float64, Dev); // requires no grad: the checkpoint must still reach the weights
        var expected = layer.forward(x).tanh().pow(2).sum();
        expected.backward();
        var gw = layer.weight!.grad!.clone();
        var gb = layer.bias!.grad!.clone();
        layer.zero_grad();
        var y = torchx.utils.checkpoint(t => layer.forward(t).tanh(), x).pow(2).sum();
        Assert.Equal(expected.item<double>(), y.item<double>(), 12);
        y.backward();
        Assert.True(layer.weight!.grad!.allclose(gw, 1e-12, 1e-12));
        Assert.True(layer.bias!.grad!.allclose(gb, 1e-12, 1e-12));
        using (no_grad()) Assert.False(torchx.utils.checkpoint(t => layer.forward(t), x).requires_grad);
    }

    [Fact]
    public void An_exception_in_backward_s_recomputation_fails_backward_with_the_original_exception()
    {
        using var scope = NewDisposeScope();
        var calls = 0;
        var x = randn([3], device: Dev).requires_grad_();
        var y = torchx.utils.checkpoint(t => ++calls == 2 ? throw new InvalidOperationException("recompute boom") : t * 2, x);
        var e = Assert.Throws<TorchException>(() => torchx.Guard(() => y.sum().backward()));
        Assert.Contains("recompute boom", e.Message);
        var original = e.InnerException;
        while (original?.InnerException is not null) original = original.InnerException;
        Assert.Equal("recompute boom", original!.Message);
        // The process and autograd still work.
        var z = torchx.utils.checkpoint(t => t * 3, x);
        z.sum().backward();
        Assert.True(x.grad!.allclose(full([3], 3f, device: Dev)));
    }

    /// <summary>
    /// The checkpoint keeps only its output and its input (no copy of the output, as TorchSharp's Function would), frees
    /// the saved input after backward and everything else when the graph dies: no tensor is left to the GC.
    /// </summary>
    [Fact]
    public void Checkpoint_keeps_only_its_input_and_frees_everything_deterministically()
    {
        var x = randn([4, 4], device: Dev).requires_grad_();
        Quiesce();
        var before = torchx.LiveTensorCount;
        var y = torchx.utils.checkpoint(t => t.sin(), x);
        // y, the saved alias of x, and (x being a leaf) the node's handle to it, through which backward may set x's .grad
        // (CustomFunction.AccumulateLeafGradients); freed with the saved alias.
        Assert.Equal(before + (CustomFunction.LeafGradients ? 3 : 2), torchx.LiveTensorCount);
        using (var s = y.sum()) s.backward();
        using (NewDisposeScope()) Assert.True(x.grad!.allclose(x.detach().cos()));
        y.Dispose(); // the graph dies with its last output: the gradient handed to libtorch is freed too
        Assert.Equal(before, torchx.LiveTensorCount);
        x.Dispose();
    }

    [Fact]
    public void Scaled_dot_product_attention_gradients()
    {
        using var scope = NewDisposeScope();
        var k = randn([1, 2, 4, 3], ScalarType.Float64, Dev);
        var v = randn([1, 2, 4, 3], ScalarType.Float64, Dev);
        CheckGradient(q => FX.scaled_dot_product_attention(q, k, v, is_causal: true), [1, 2, 4, 3]);
        var q0 = randn([1, 4, 4, 3], ScalarType.Float64, Dev);
        var gqa = FX.Fused.Gqa;
        try
        {
            // Both GQA paths: k/v repeated for one SDPA call (the default) and query heads split into groups (Fused.Gqa).
            foreach (var split in new[] { false, true })
            {
                FX.Fused.Gqa = split;
                CheckGradient(kk => FX.scaled_dot_product_attention(q0, kk, v, is_causal: true, enable_gqa: true, scale: 0.3), [1, 2, 4, 3]);
                CheckGradient(vv => FX.scaled_dot_product_attention(q0, k, vv, enable_gqa: true), [1, 2, 4, 3]);
            }
        }
        finally
        {
            FX.Fused.Gqa = gqa;
        }
    }

    /// <summary>
    /// Settles process-wide tensor counts before counting: finalizers of tensors earlier tests left to the GC, and device
    /// inputs of offloaded checkpoints still awaiting their copies, would otherwise be freed in the middle of a count.
    /// </summary>
    internal static void Quiesce()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        torchx.utils.empty_offload_cache();
    }
}
