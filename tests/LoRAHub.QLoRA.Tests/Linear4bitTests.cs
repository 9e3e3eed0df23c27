using LoRAHub.TorchExtensions.Modules;
using LoRAHub.TorchExtensions.Quantization;
using TorchSharp.Modules;

namespace LoRAHub.QLoRA.Tests;

using F = torch.nn.functional;

/// <summary>bnb.nn.Linear4bit's contract: forward and input gradient as a dense Linear with the dequantized weight.</summary>
public class Linear4bitTests
{
    private static readonly Device Dev = TestDevice.Current;

    private static Linear Dense(long inF, long outF, bool bias, long seed = 0)
    {
        torchx.manual_seed(seed);
        var l = nn.Linear(inF, outF, hasBias: bias, device: Dev, dtype: ScalarType.Float32);
        using var _ = torch.no_grad();
        l.weight.normal_(0, 0.05);
        l.bias?.normal_(0, 0.05);
        return l;
    }

    [Theory]
    [InlineData("nf4", true, ScalarType.Float32)]
    [InlineData("fp4", false, ScalarType.Float32)]
    [InlineData("nf4", true, ScalarType.BFloat16)]
    [InlineData("nf4", false, ScalarType.Float16)]
    public void Forward_equals_linear_with_the_dequantized_weight(string type, bool dq, ScalarType compute)
    {
        if (compute == ScalarType.Float16 && !TestDevice.IsCuda) return; // CPU libtorch has no fp16 matmul
        using var scope = torch.NewDisposeScope();
        using var dense = Dense(128, 96, bias: true);
        using var q = Linear4bit.FromLinear(LinearLayer.From(dense)!, Dev, type, 64, dq, compute);
        torchx.manual_seed(5);
        var x = torch.randn([3, 7, 128], device: Dev);
        var y = q.forward(x);
        Assert.Equal(ScalarType.Float32, y.dtype); // back in the input's dtype
        Assert.Equal(new long[] { 3, 7, 96 }, y.shape);
        var w = q.dense_weight();
        Assert.Equal(compute, w.dtype);
        var expected = (F.linear(x.to(compute), w) + q.bias!.to(compute)).to(ScalarType.Float32);
        Assert.True(y.Equals(expected), $"max diff {(y - expected).abs().max().ToDouble()}");
        // The 4-bit layer approximates the dense one (relative error of NF4 ≈ 0.1, FP4 coarser).
        var denseOut = dense.forward(x);
        var relative = (y - denseOut).pow(2).sum().sqrt().ToDouble() / denseOut.pow(2).sum().sqrt().ToDouble();
        Assert.True(relative < (type == "nf4" ? 0.15 : 0.3), $"relative error {relative}");
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void Input_and_bias_gradients_equal_the_dense_ones(ScalarType compute)
    {
        using var scope = torch.NewDisposeScope();
        using var dense = Dense(64, 48, bias: true, seed: 1);
        using var q = Linear4bit.FromLinear(LinearLayer.From(dense)!, Dev, "nf4", 64, true, compute);
        q.bias!.requires_grad = true;
        torchx.manual_seed(6);
        var x = torch.randn([5, 64], device: Dev).requires_grad_();
        var g = torch.randn([5, 48], device: Dev);
        (q.forward(x) * g).sum().backward();

        var w = q.dense_weight().detach();
        var b = q.bias.detach().clone().requires_grad_();
        var xd = x.detach().clone().requires_grad_();
        ((F.linear(xd.to(compute), w) + b.to(compute)).to(ScalarType.Float32) * g).sum().backward();
        Assert.True(x.grad!.Equals(xd.grad!), $"input grad differs by {(x.grad! - xd.grad!).abs().max().ToDouble()}");
        Assert.True(q.bias.grad!.allclose(b.grad!, 1e-5, 1e-5));
    }

    [Fact]
    public void Buffers_sizes_and_interface()
    {
        using var scope = torch.NewDisposeScope();
        using var dense = Dense(256, 64, bias: false);
        using var plain = Linear4bit.FromLinear(LinearLayer.From(dense)!, Dev, "nf4", 64, double_quant: false, ScalarType.BFloat16);
        using var nested = Linear4bit.FromLinear(LinearLayer.From(dense)!, Dev, "nf4", 64, double_quant: true, ScalarType.BFloat16);
        long n = 256 * 64;
        Assert.Equal(4.5, plain.weight_bytes * 8.0 / n, 6);
        Assert.Equal(n / 2 + n / 64 + 4 * (n / 64 / 256), nested.weight_bytes); // ≈ 4.127 bits per weight
        Assert.Equal(["weight", "absmax", "quant_map"], plain.named_buffers().Select(b => b.name));
        Assert.Equal(["weight", "absmax", "nested_absmax", "quant_map", "nested_quant_map"], nested.named_buffers().Select(b => b.name));
        Assert.Empty(nested.parameters());
        ILinearLayer l = nested;
        Assert.Equal(256, l.in_features);
        Assert.Equal(64, l.out_features);
        Assert.Equal(ScalarType.BFloat16, l.weight_dtype);
        Assert.Equal(Dev.ToString(), l.weight_device.ToString());
        Assert.Equal(ScalarType.Byte, nested.named_buffers().First().buffer.dtype);
    }

    [Fact]
    public void Add_to_weight_requantizes_the_sum()
    {
        using var scope = torch.NewDisposeScope();
        using var dense = Dense(64, 64, bias: false, seed: 2);
        using var q = Linear4bit.FromLinear(LinearLayer.From(dense)!, Dev, "nf4", 64, true, ScalarType.Float32);
        var before = q.dense_weight();
        var packed = q.named_buffers().First().buffer;
        var delta = torch.full([64, 64], 0.01, device: Dev);
        q.add_to_weight_(delta);
        Assert.Same(packed, q.named_buffers().First().buffer); // same buffer tensors, new contents
        var after = q.dense_weight();
        var err = (after - (before + delta)).abs().max().ToDouble();
        Assert.True(err < 0.05, $"requantized sum off by {err}");
        Assert.False(after.Equals(before));
        Assert.Throws<ArgumentException>(() => q.add_to_weight_(torch.ones([2, 2], device: Dev)));
    }

    [Fact]
    public void Bad_inputs_are_clear_errors()
    {
        using var scope = torch.NewDisposeScope();
        using var dense = Dense(64, 8, bias: false);
        using var q = Linear4bit.FromLinear(LinearLayer.From(dense)!, Dev, "nf4", 64, true, ScalarType.Float32);
        var e = Assert.ThrowsAny<TorchException>(() => q.forward(torch.randn([2, 32], device: Dev)));
        Assert.Contains("64 features", e.Message);
        Assert.Throws<ArgumentException>(() => Linear4bit.FromLinear(LinearLayer.From(dense)!, Dev, "int4"));
        Assert.Throws<ArgumentException>(() => new Linear4bit(FourBit.Quantize(torch.ones([64]), "nf4", 64)));
        if (TestDevice.IsCuda)
        {
            var wrong = Assert.ThrowsAny<TorchException>(() => q.forward(torch.randn([2, 64])));
            Assert.Contains("cuda", wrong.Message);
        }
    }

    [Fact]
    public void Autograd_keeps_no_dequantized_weight_on_cuda()
    {
        // Exact allocation figures need CUDA with PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync (see torchx.cuda): the
        // caching allocator's used-memory figure would not see a weight kept alive in a block it already holds.
        if (!TestDevice.IsCuda || !torchx.cuda.memory_stats_exact) return;
        using var scope = torch.NewDisposeScope();
        using var dense = Dense(4096, 6144, bias: false);
        using var q = Linear4bit.FromLinear(LinearLayer.From(dense)!, Dev, "nf4", 64, true, ScalarType.BFloat16);
        var x = torch.randn([8, 4096], ScalarType.BFloat16, Dev).requires_grad_();
        // Warm-up on this thread: cuBLAS takes its workspace (32 MiB on Hopper) from the caching allocator per handle.
        using (var warm = torch.NewDisposeScope()) q.forward(x).sum().backward();
        x.grad = null;
        torchx.cuda.synchronize();
        var before = torchx.cuda.memory_allocated();
        var y = q.forward(x);
        torchx.cuda.synchronize();
        var kept = torchx.cuda.memory_allocated() - before;
        var denseBytes = 6144L * 4096 * 2;
        Assert.True(kept < denseBytes / 4, $"forward kept {kept} bytes alive (a dense bf16 weight is {denseBytes})");
        y.sum().backward();
        Assert.NotNull(x.grad);
    }
}
