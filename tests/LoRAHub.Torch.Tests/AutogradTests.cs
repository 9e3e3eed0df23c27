namespace LoRAHub.Torch.Tests;

using F = torch.nn.functional;

/// <summary>Every bound differentiable op: autograd's gradient against central finite differences (float64).</summary>
public class AutogradTests
{
    private static readonly Device Dev = TestDevice.Current;

    /// <summary>Checks d(sum(f(x) * w))/dx for a random weighting w, one input element at a time.</summary>
    private static void CheckGradient(Func<Tensor, Tensor> f, long[] shape, double lo = -1, double hi = 1, int seed = 0)
    {
        using var scope = torch.NewDisposeScope();
        torch.manual_seed(seed);
        var x = (torch.rand(shape, ScalarType.Float64, Dev) * (hi - lo) + lo).detach().requires_grad_();
        Tensor w;
        using (torch.no_grad())
        {
            using var probe = f(x);
            w = torch.randn(probe.shape, ScalarType.Float64, Dev);
        }
        var y = (f(x) * w).sum();
        y.backward();
        var analytic = x.grad!.cpu().data<double>();

        var values = x.detach().cpu().data<double>();
        const double h = 1e-6;
        double Eval(double[] v)
        {
            using var inner = torch.NewDisposeScope();
            using var _ = torch.no_grad();
            var xt = torch.tensor(v, shape, Dev);
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

    public static TheoryData<string> UnaryOps => new()
    {
        "neg", "abs", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "relu", "silu", "gelu", "gelu_tanh",
        "square", "reciprocal", "log1p", "expm1", "erf",
    };

    [Theory]
    [MemberData(nameof(UnaryOps))]
    public void Unary(string op)
    {
        Func<Tensor, Tensor> f = op switch
        {
            "neg" => x => x.neg(), "abs" => x => x.abs(), "exp" => x => x.exp(), "log" => x => x.log(),
            "sqrt" => x => x.sqrt(), "rsqrt" => x => x.rsqrt(), "sin" => x => x.sin(), "cos" => x => x.cos(),
            "tanh" => x => x.tanh(), "sigmoid" => x => x.sigmoid(), "relu" => x => x.relu(), "silu" => x => x.silu(),
            "gelu" => x => x.gelu(), "gelu_tanh" => x => x.gelu("tanh"), "square" => x => x.square(),
            "reciprocal" => x => x.reciprocal(), "log1p" => x => x.log1p(), "expm1" => x => x.expm1(), "erf" => x => x.erf(),
            _ => throw new ArgumentException(op),
        };
        // Positive inputs keep log/sqrt/reciprocal smooth; abs/relu avoid 0 with probability 1.
        var positive = op is "log" or "sqrt" or "rsqrt" or "reciprocal" or "log1p";
        CheckGradient(f, [3, 4], positive ? 0.5 : -2, 2);
    }

    [Fact] public void Add_sub_mul_div_pow_with_broadcasting()
    {
        using var scope = torch.NewDisposeScope();
        var b = torch.rand([4], ScalarType.Float64, Dev) + 0.5;
        CheckGradient(x => x + b, [3, 4]);
        CheckGradient(x => x - b * 2, [3, 4]);
        CheckGradient(x => x * b, [3, 4]);
        CheckGradient(x => b / (x + 3), [3, 4]);
        CheckGradient(x => (x + 2).pow(2.5), [3, 4]);
        CheckGradient(x => x.add(x.mul(x), 0.5), [3]);
        CheckGradient(x => 1.0 - x / 3.0, [5]);
    }

    [Fact] public void Matmul_and_linear()
    {
        using var scope = torch.NewDisposeScope();
        var w = torch.randn([5, 4], ScalarType.Float64, Dev);
        var bias = torch.randn([5], ScalarType.Float64, Dev);
        CheckGradient(x => x.matmul(w.t()), [3, 4]);
        CheckGradient(x => F.linear(x, w, bias), [2, 3, 4]);
        var input = torch.randn([3, 4], ScalarType.Float64, Dev);
        CheckGradient(weight => F.linear(input, weight), [5, 4]);
        CheckGradient(x => x.matmul(x.transpose(0, 1)), [3, 3]);
    }

    [Fact] public void Reductions()
    {
        CheckGradient(x => x.sum(), [3, 4]);
        CheckGradient(x => x.mean(1), [3, 4]);
        CheckGradient(x => x.sum([0L, 1L], keepdim: true), [2, 3, 2]);
        CheckGradient(x => x.amax(1), [3, 4]);
        CheckGradient(x => x.logsumexp(-1), [3, 4]);
        CheckGradient(x => x.norm(), [3, 4]);
        CheckGradient(x => x.var(1), [3, 4]);
        CheckGradient(x => x.std(0), [3, 4]);
        CheckGradient(x => x.cumsum(1), [2, 4]);
    }

    [Fact] public void Shapes_and_indexing()
    {
        using var scope = torch.NewDisposeScope();
        var idx = torch.tensor(new long[] { 2, 0, 2 }, device: Dev);
        CheckGradient(x => x.view(4, 3).t(), [3, 4]);
        CheckGradient(x => x.reshape(2, 6).permute(1, 0), [3, 4]);
        CheckGradient(x => x[1.., ..2], [3, 4]);
        CheckGradient(x => x.narrow(1, 1, 2).unsqueeze(0).squeeze(0), [3, 4]);
        CheckGradient(x => x.index_select(0, idx), [3, 4]);
        CheckGradient(x => x.gather(1, torch.tensor(new long[] { 0, 3, 1, 1, 2, 2 }, [3, 2], Dev)), [3, 4]);
        CheckGradient(x => torch.cat([x, x * 2], 1), [2, 3]);
        CheckGradient(x => torch.stack([x, x.exp()], 0), [2, 3]);
        CheckGradient(x => x.chunk(2, 1)[1] * x.split(2, 1)[0], [2, 4]);
        CheckGradient(x => x.expand(3, 2, 4), [2, 4]);
        CheckGradient(x => x.repeat_interleave(2, 0), [2, 3]);
        CheckGradient(x => x.tril(), [3, 3]);
        CheckGradient(x => x.where(x.gt(0), x * 3), [3, 4]);
        CheckGradient(x => x.masked_fill(x.lt(0), 0), [3, 4]);
        CheckGradient(x => x.clamp(-0.5, 0.5), [3, 4]);
    }

    [Fact] public void Nn_functions()
    {
        using var scope = torch.NewDisposeScope();
        var w = torch.rand([4], ScalarType.Float64, Dev) + 0.5;
        var b = torch.randn([4], ScalarType.Float64, Dev);
        var target = torch.tensor(new long[] { 1, -100, 3 }, device: Dev);
        var table = torch.randn([6, 4], ScalarType.Float64, Dev);
        CheckGradient(x => F.softmax(x, -1), [3, 4]);
        CheckGradient(x => F.log_softmax(x, 0), [3, 4]);
        CheckGradient(x => F.cross_entropy(x, target), [3, 4]);
        CheckGradient(x => F.cross_entropy(x, target, label_smoothing: 0.1), [3, 4]);
        CheckGradient(x => F.rms_norm(x, w, 1e-6), [3, 4]);
        CheckGradient(x => F.layer_norm(x, [4], w, b), [3, 4]);
        CheckGradient(x => F.mse_loss(x, b.expand(3, 4)), [3, 4]);
        CheckGradient(t => F.embedding(torch.tensor(new long[] { 5, 0, 5 }, device: Dev), t), [6, 4]);
        CheckGradient(x => F.rms_norm(table, x, 1e-6), [4]);
    }

    [Fact] public void Chunked_cross_entropy_matches_full_logits_and_its_gradients()
    {
        using var scope = torch.NewDisposeScope();
        torch.manual_seed(3);
        var labels = torch.tensor(new long[] { 1, -100, 4, 0, 2, 3, -100 }, device: Dev);
        var weight = torch.randn([5, 4], ScalarType.Float64, Dev);
        var hidden = torch.randn([7, 4], ScalarType.Float64, Dev);
        var full = F.cross_entropy(F.linear(hidden, weight), labels);
        var chunked = F.chunked_cross_entropy(hidden, weight, labels, chunk_size: 3);
        Assert.Equal(full.item<double>(), chunked.item<double>(), 5);
        CheckGradient(h => F.chunked_cross_entropy(h, weight, labels, chunk_size: 2), [7, 4]);
        CheckGradient(w => F.chunked_cross_entropy(hidden, w, labels, chunk_size: 4), [5, 4]);
    }

    [Fact] public void Checkpoint_gives_the_same_values_and_gradients()
    {
        using var scope = torch.NewDisposeScope();
        torch.manual_seed(5);
        var w = torch.randn([4, 4], ScalarType.Float64, Dev).requires_grad_();
        Tensor Block(Tensor x) => F.dropout(F.linear(x, w).tanh(), 0.3, true) + x;
        var input = torch.randn([3, 4], ScalarType.Float64, Dev);

        torch.manual_seed(9);
        var plain = Block(input).pow(2).sum();
        plain.backward();
        var expectedGrad = w.grad!.clone();
        w.grad = null;

        torch.manual_seed(9);
        var checkpointed = torch.utils.checkpoint(Block, input).pow(2).sum();
        Assert.Equal(plain.item<double>(), checkpointed.item<double>(), 10);
        checkpointed.backward();
        Assert.True(w.grad!.allclose(expectedGrad, 1e-10, 1e-12), "parameter gradients through recomputation (same dropout mask)");

        // Input gradients flow through too.
        CheckGradient(x => torch.utils.checkpoint(t => F.linear(t, w.detach()).tanh(), x), [3, 4]);
        var e = Assert.Throws<TorchException>(() => torch.utils.checkpoint(_ => throw new InvalidOperationException("boom"), input));
        Assert.Contains("boom", e.Message);
    }

    [Fact] public void Scaled_dot_product_attention()
    {
        using var scope = torch.NewDisposeScope();
        var k = torch.randn([1, 2, 4, 3], ScalarType.Float64, Dev);
        var v = torch.randn([1, 2, 4, 3], ScalarType.Float64, Dev);
        CheckGradient(q => F.scaled_dot_product_attention(q, k, v, is_causal: true), [1, 2, 4, 3]);
        var q0 = torch.randn([1, 2, 4, 3], ScalarType.Float64, Dev);
        CheckGradient(kk => F.scaled_dot_product_attention(q0, kk, v), [1, 2, 4, 3]);
    }

    [Fact]
    public void No_grad_detach_and_requires_grad()
    {
        using var scope = torch.NewDisposeScope();
        var x = torch.ones([2], requires_grad: true);
        using (torch.no_grad())
        {
            Assert.False(torch.is_grad_enabled());
            Assert.False((x * 2).requires_grad);
        }
        Assert.True(torch.is_grad_enabled());
        Assert.True((x * 2).requires_grad);
        Assert.False((x * 2).detach().requires_grad);
        Assert.True(x.is_leaf);
        Assert.Null(x.grad);
        (x * 3).sum().backward();
        Assert.Equal(new[] { 3f, 3f }, x.grad!.data<float>());
        (x * 3).sum().backward();
        Assert.Equal(new[] { 6f, 6f }, x.grad!.data<float>());
        x.grad = null;
        Assert.Null(x.grad);
    }
}
