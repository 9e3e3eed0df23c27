using F = TorchSharp.torch.nn.functional;
using FX = LoRAHub.TorchExtensions.torchx.nn.functional;

namespace LoRAHub.Models.Tests;

/// <summary>
/// chunked_cross_entropy, fused (gradients made in forward) and recompute variants, against the plain cross_entropy of
/// the full logits: loss and gradients, ignored rows, chunks that do not divide N, an upstream gradient other than 1, a
/// weight with and without grad. On CUDA when LORAHUB_TEST_DEVICE=cuda.
/// </summary>
public sealed class FusedCrossEntropyTests
{
    private static readonly Device Dev = TinyModels.Device;

    private static (Tensor loss, Tensor? dh, Tensor? dw) Run(Func<Tensor, Tensor, Tensor> loss, Tensor hidden, Tensor weight, bool weightGrad, double upstream)
    {
        var h = hidden.detach().clone().requires_grad_();
        var w = weight.detach().clone().requires_grad_(weightGrad);
        var value = loss(h, w);
        (value * upstream).backward();
        return (value.detach(), h.grad, weightGrad ? w.grad : null);
    }

    private static float RelErr(Tensor a, Tensor b)
    {
        using var scope = NewDisposeScope();
        var (x, y) = (a.to(ScalarType.Float64), b.to(ScalarType.Float64));
        return (float)((x - y).abs().max().item<double>() / Math.Max(1e-12, y.abs().max().item<double>()));
    }

    [Theory]
    [InlineData(false, 3L, true, 1.0)]
    [InlineData(false, 4L, false, 0.37)]
    [InlineData(true, 3L, true, -2.5)]
    [InlineData(true, 64L, false, 1.0)]
    public void Fp32_loss_and_gradients_equal_plain_cross_entropy(bool recompute, long chunk, bool weightGrad, double upstream)
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(11);
        var labels = tensor(new long[] { 1, -100, 4, 0, 2, 3, -100, 9, 7, 5, 6 }, device: Dev); // 11 rows: no chunk size divides it
        var weight = randn([10, 8], ScalarType.Float32, Dev);
        var hidden = randn([11, 8], ScalarType.Float32, Dev);
        var (lp, dhp, dwp) = Run((h, w) => F.cross_entropy(F.linear(h, w), labels), hidden, weight, weightGrad, upstream);
        var (lc, dhc, dwc) = Run((h, w) => FX.chunked_cross_entropy(h, w, labels, chunk, recompute: recompute), hidden, weight, weightGrad, upstream);
        Assert.True(Math.Abs(lp.item<float>() - lc.item<float>()) <= 1e-5 * Math.Abs(lp.item<float>()), $"loss {lc.item<float>()} vs {lp.item<float>()}");
        Assert.True(RelErr(dhc!, dhp!) < 1e-5, $"hidden gradient differs by {RelErr(dhc!, dhp!)}");
        Assert.Equal(0f, dhc![1].abs().sum().item<float>()); // an ignored row gets no gradient
        if (weightGrad) Assert.True(RelErr(dwc!, dwp!) < 1e-5, $"weight gradient differs by {RelErr(dwc!, dwp!)}");
    }

    [Fact]
    public void Fused_bf16_is_close_to_plain_cross_entropy_of_fp32_logits()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(12);
        var labels = randint(0, 50, [37], ScalarType.Int64, Dev);
        labels[3] = tensor(-100L);
        var weight = (randn([50, 16], ScalarType.Float32, Dev) * 0.5).bfloat16();
        var hidden = randn([37, 16], ScalarType.Float32, Dev).bfloat16();
        var (lp, dhp, dwp) = Run((h, w) => F.cross_entropy(F.linear(h.@float(), w.@float()), labels), hidden, weight, true, 0.5);
        var (lc, dhc, dwc) = Run((h, w) => FX.chunked_cross_entropy(h, w, labels, 8, recompute: false), hidden, weight, true, 0.5);
        Assert.Equal(ScalarType.Float32, lc.dtype);
        Assert.Equal(ScalarType.BFloat16, dhc!.dtype);
        Assert.Equal(ScalarType.BFloat16, dwc!.dtype);
        // The logits are rounded to bf16 by the GEMM before the fp32 softmax: loss within bf16 noise.
        Assert.True(Math.Abs(lp.item<float>() - lc.item<float>()) < 2e-2 * lp.item<float>(), $"loss {lc.item<float>()} vs {lp.item<float>()}");
        Assert.True(RelErr(dhc, dhp!) < 2e-2, $"hidden gradient differs by {RelErr(dhc, dhp!)}");
        Assert.True(RelErr(dwc, dwp!) < 2e-2, $"weight gradient differs by {RelErr(dwc, dwp!)}");
        Assert.Equal(0f, dhc[3].abs().sum().@float().item<float>());
    }

    [Fact]
    public void Fused_and_recompute_agree_in_fp64_and_pass_a_gradient_check()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(13);
        var labels = tensor(new long[] { 2, -100, 0, 4, 1 }, device: Dev);
        var weight = randn([5, 3], ScalarType.Float64, Dev);
        var hidden = randn([5, 3], ScalarType.Float64, Dev);
        var (lf, dhf, dwf) = Run((h, w) => FX.chunked_cross_entropy(h, w, labels, 2, recompute: false), hidden, weight, true, 1.7);
        var (lr, dhr, dwr) = Run((h, w) => FX.chunked_cross_entropy(h, w, labels, 2, recompute: true), hidden, weight, true, 1.7);
        Assert.True(Math.Abs(lr.item<double>() - lf.item<double>()) < 1e-12);
        Assert.True(RelErr(dhf!, dhr!) < 1e-12 && RelErr(dwf!, dwr!) < 1e-12);
        // Central differences of the fused loss against its hidden gradient.
        var flat = hidden.flatten();
        for (var i = 0; i < flat.size(0); i++)
        {
            using var inner = NewDisposeScope();
            double Eval(double delta)
            {
                using var noGrad = no_grad();
                var h = hidden.clone();
                h.view(-1)[i] += delta;
                return FX.chunked_cross_entropy(h, weight, labels, 2, recompute: false).item<double>();
            }
            var numeric = (Eval(1e-6) - Eval(-1e-6)) / 2e-6 * 1.7;
            Assert.True(Math.Abs(numeric - dhf!.view(-1)[i].item<double>()) < 1e-6, $"element {i}: numeric {numeric}, fused {dhf.view(-1)[i].item<double>()}");
        }
    }

    [Fact]
    public void Without_grad_the_fused_path_only_computes_the_loss()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(14);
        var labels = tensor(new long[] { -100, -100, -100 }, device: Dev);
        var hidden = randn([3, 4], device: Dev).requires_grad_();
        var weight = randn([6, 4], device: Dev);
        using (no_grad())
        {
            var loss = FX.chunked_cross_entropy(hidden, weight, labels);
            Assert.False(loss.requires_grad);
            Assert.Equal(0f, loss.item<float>()); // every row ignored: zero, not NaN
        }
        Assert.Throws<ArgumentException>(() => FX.chunked_cross_entropy(hidden, randn([6, 5], device: Dev), labels));
    }
}
