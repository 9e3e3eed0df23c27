using Fused = LoRAHub.TorchExtensions.torchx.nn.functional.Fused;

namespace LoRAHub.DoRA.Tests;

/// <summary>
/// The DoRA ops: DoraOps.dora_weight_norm (shape checks, then the factored norm) against DoraWeightNorm.Factored (every device), DoraOps.dora_output's
/// composite path against the definition, and on CUDA (LORAHUB_TEST_DEVICE=cuda) the fused kernels against an fp64
/// reference, forward and backward, in fp32, fp16 and bf16, with a launch-count check so a silent fallback fails.
/// </summary>
public class DoraFusedTests
{
    private static readonly Device Dev = torch.device(Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") ?? "cpu");
    private static bool Cuda => Dev.type == DeviceType.CUDA;

    private static float[] Values(Tensor t) => t.detach().cpu().to(ScalarType.Float32).contiguous().data<float>().ToArray();

    // |a − b| ≤ atol + rtol·|b| elementwise, with atol relative to b's largest magnitude.
    private static void AssertClose(Tensor actual, Tensor expected, double rtol, double atolScale, string what)
    {
        Assert.Equal(expected.shape, actual.shape);
        var a = Values(actual);
        var b = Values(expected);
        var scale = b.Length == 0 ? 0 : b.Max(v => Math.Abs(v));
        var atol = atolScale * Math.Max(scale, 1e-6);
        for (var i = 0; i < a.Length; i++)
        {
            Assert.False(float.IsNaN(a[i]), $"{what}: NaN at {i}");
            Assert.True(Math.Abs(a[i] - b[i]) <= atol + rtol * Math.Abs(b[i]), $"{what}: element {i} is {a[i]}, expected {b[i]} (scale {scale})");
        }
    }

    [Theory]
    [InlineData(ScalarType.Float64, ScalarType.Float64)]
    [InlineData(ScalarType.Float32, ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16, ScalarType.Float32)]
    public void Native_weight_norm_equals_the_plugins_factored_norm_with_gradients(ScalarType baseType, ScalarType adapterType)
    {
        using var scope = torch.NewDisposeScope();
        torchx.manual_seed(3);
        var w0 = torch.randn([24, 40], ScalarType.Float32, Dev).to(baseType);
        var a0 = torch.randn([6, 40], adapterType, Dev).mul(0.2);
        var b0 = torch.randn([24, 6], adapterType, Dev).mul(0.3);
        const double s = 1.7;
        var baseNorms = DoraWeightNorm.RowNormsSquared(w0, DoraWeightNorm.AccumulationType(a0));
        var results = new List<(Tensor norm, Tensor ga, Tensor gb)>();
        foreach (var native in new[] { false, true })
        {
            var a = a0.clone().requires_grad_();
            var b = b0.clone().requires_grad_();
            var norm = native ? DoraOps.dora_weight_norm(w0, baseNorms, a, b, s) : DoraWeightNorm.Factored(w0, baseNorms, a, b, s);
            norm.mul(torch.arange(1, 25, 1, norm.dtype, Dev)).sum().backward();
            results.Add((norm.detach(), a.grad!, b.grad!));
        }
        Assert.Equal(results[0].norm.dtype, results[1].norm.dtype);
        // The same ops in the same order: identical results.
        Assert.True(results[1].norm.Equals(results[0].norm), "norm");
        Assert.True(results[1].ga.allclose(results[0].ga, 1e-6, 1e-7), "dA");
        Assert.True(results[1].gb.allclose(results[0].gb, 1e-6, 1e-7), "dB");
        // And the definition.
        var v = w0.to(ScalarType.Float64).add(b0.to(ScalarType.Float64).matmul(a0.to(ScalarType.Float64)), alpha: s);
        var tolerance = baseType == ScalarType.Float64 ? 1e-12 : baseType == ScalarType.Float32 ? 1e-5 : 1e-2;
        Assert.True(results[1].norm.to(ScalarType.Float64).allclose(v.norm(dim: 1), tolerance, tolerance));
    }

    [Fact]
    public void Native_weight_norm_rejects_mismatched_shapes()
    {
        using var scope = torch.NewDisposeScope();
        var ex = Assert.ThrowsAny<TorchException>(() =>
            DoraOps.dora_weight_norm(torch.zeros([4, 8]), torch.zeros([4]), torch.zeros([2, 9]), torch.zeros([4, 2]), 1.0));
        Assert.Contains("shapes do not fit", ex.Message);
        var ex2 = Assert.ThrowsAny<TorchException>(() => DoraOps.dora_output(torch.zeros([3, 4]), torch.ones([5]), torch.ones([4])));
        Assert.Contains("does not match", ex2.Message);
    }

    // The definition in fp64 from the same inputs: y = t + c·(t − b), c = m/n − 1; gradients by hand.
    private static (Tensor y, Tensor gt, Tensor gm, Tensor gn) Reference(Tensor t, Tensor m, Tensor n, Tensor? bias, Tensor g)
    {
        var t64 = t.to(ScalarType.Float64);
        var m64 = m.to(ScalarType.Float64);
        var n64 = n.to(ScalarType.Float64);
        var g64 = g.to(ScalarType.Float64);
        var c = m64.div(n64).sub(1.0);
        var centered = bias is null ? t64 : t64.sub(bias.to(ScalarType.Float64));
        var y = t64.add(centered.mul(c));
        var gt = g64.mul(c.add(1.0));
        var gc = g64.mul(centered).reshape(-1, t.size(-1)).sum(dim: 0);
        return (y, gt, gc.div(n64), gc.mul(m64).div(n64.square()).neg());
    }

    [Theory]
    [InlineData(false, false)]
    [InlineData(true, true)]
    public void Composite_output_matches_the_definition_and_the_fused_switch_falls_back_off_cuda(bool bias, bool normGrad)
    {
        using var scope = torch.NewDisposeScope();
        torchx.manual_seed(11);
        var t = torch.randn([3, 5, 12], ScalarType.Float64, Dev).requires_grad_();
        var m = torch.rand([12], ScalarType.Float64, Dev).add(0.5).requires_grad_();
        var n = torch.rand([12], ScalarType.Float64, Dev).add(0.5).requires_grad_(normGrad);
        var b = bias ? torch.randn([12], ScalarType.Float64, Dev) : null;
        var g = torch.randn([3, 5, 12], ScalarType.Float64, Dev);
        var before = Fused.LaunchCount;
        var y = DoraOps.dora_output(t, m, n, b, fused: true);   // fp64: the composite ops on every device
        Assert.Equal(before, Fused.LaunchCount);
        y.mul(g).sum().backward();
        var r = Reference(t, m, n, b, g);
        Assert.True(y.allclose(r.y, 1e-12, 1e-12), "y");
        Assert.True(t.grad!.allclose(r.gt, 1e-12, 1e-12), "dt");
        Assert.True(m.grad!.allclose(r.gm, 1e-10, 1e-12), "dm");
        if (normGrad) Assert.True(n.grad!.allclose(r.gn, 1e-10, 1e-12), "dnorm");
        else Assert.Null(n.grad);
    }

    // ---------------------------------------------------------------- fused kernels (CUDA)

    [Theory]
    [InlineData(4, 128, 2048, false, false)]
    [InlineData(2, 128, 8192, true, false)]   // several row blocks per column tile
    [InlineData(3, 7, 100, true, true)]       // 100 columns: the scalar kernel for 16-bit types, vectors for fp32
    [InlineData(1, 5, 36, false, true)]
    public void Fused_output_matches_an_fp64_reference(int batch, int seq, int cols, bool bias, bool normGrad)
    {
        if (!Cuda) return;
        Assert.True(Fused.KernelsAvailable, "LORAHUB_TEST_DEVICE=cuda but the native library has no CUDA kernels");
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16 })
        {
            using var scope = torch.NewDisposeScope();
            torchx.manual_seed(batch * 100000 + cols);
            var t0 = torch.randn([batch, seq, cols], ScalarType.Float32, Dev).to(dtype);
            // m/‖V‖ within a few percent of 1, as in training: the correction must keep its bits.
            var n0 = torch.rand([cols], ScalarType.Float32, Dev).add(0.5);
            var m0 = n0.mul(torch.randn([cols], ScalarType.Float32, Dev).mul(0.03).add(1.0));
            var b = bias ? torch.randn([cols], ScalarType.Float32, Dev).mul(0.5).to(dtype) : null;
            var g = torch.randn([batch, seq, cols], ScalarType.Float32, Dev).to(dtype);
            var t = t0.clone().requires_grad_();
            var m = m0.clone().requires_grad_();
            var n = n0.clone().requires_grad_(normGrad);
            var before = Fused.LaunchCount;
            var y = DoraOps.dora_output(t, m, n, b, fused: true);
            Assert.Equal(dtype, y.dtype);
            y.backward([g]);
            Assert.True(Fused.LaunchCount >= before + 3, $"{dtype}: the fused DoRA kernels did not run");
            var r = Reference(t0, m0, n0, b, g);
            // One rounding of y and of dt to the dtype; dm, dnorm accumulate in fp32 over the tokens.
            var (rtol, atol, grad) = dtype switch
            {
                ScalarType.Float32 => (1e-5, 1e-6, 1e-4),
                ScalarType.Float16 => (1e-3, 1e-4, 4e-3),
                _ => (8e-3, 1e-3, 2e-2),
            };
            AssertClose(y, r.y, rtol, atol, $"{dtype} y");
            AssertClose(t.grad!, r.gt, rtol, atol, $"{dtype} dt");
            AssertClose(m.grad!, r.gm, grad, grad, $"{dtype} dm");
            if (normGrad) AssertClose(n.grad!, r.gn, grad, grad, $"{dtype} dnorm");

            // The composite path on the same inputs stays within the same bounds of the reference (it rounds c too).
            var tc = t0.clone().requires_grad_();
            var mc = m0.clone().requires_grad_();
            var yc = DoraOps.dora_output(tc, mc, n0, b, fused: false);
            yc.backward([g]);
            AssertClose(y, yc, 2 * rtol, 2 * atol, $"{dtype} y vs composite");
            AssertClose(m.grad!, mc.grad!, 2 * grad, 2 * grad, $"{dtype} dm vs composite");
        }
    }

    [Fact]
    public void Fused_bf16_output_keeps_a_small_correction_to_one_rounding()
    {
        if (!Cuda) return;
        using var scope = torch.NewDisposeScope();
        torchx.manual_seed(2);
        var t = torch.randn([64, 256], ScalarType.Float32, Dev).to(ScalarType.BFloat16);
        var n = torch.ones([256], ScalarType.Float32, Dev);
        var m = torch.full([256], 1.0234, ScalarType.Float32, Dev);   // 1.0234 is not a bf16 number
        var y = DoraOps.dora_output(t, m, n, null, fused: true);
        var exact = t.to(ScalarType.Float64).mul(1.0234);
        // Every element is exact·(1 ± 2⁻⁸) (half a bf16 ulp): rounded once from the fp32 product, c never rounded to bf16.
        AssertClose(y, exact, Math.Pow(2, -8) * 1.001, 0, "y");
    }

    [Fact]
    public void Fused_output_under_no_grad_and_with_a_trainable_bias()
    {
        if (!Cuda) return;
        using var scope = torch.NewDisposeScope();
        torchx.manual_seed(4);
        var t = torch.randn([16, 64], ScalarType.Float32, Dev).to(ScalarType.BFloat16);
        var m = torch.rand([64], ScalarType.Float32, Dev).add(0.5);
        var n = torch.rand([64], ScalarType.Float32, Dev).add(0.5);
        var bias = torch.randn([64], ScalarType.Float32, Dev).to(ScalarType.BFloat16).requires_grad_();
        Tensor y;
        using (torch.no_grad()) y = DoraOps.dora_output(t, m, n, bias, fused: true);
        var r = Reference(t, m, n, bias.detach(), torch.ones_like(t));
        AssertClose(y, r.y, 8e-3, 1e-3, "y under no_grad");
        // A trainable bias takes the composite ops (the kernels give no bias gradient); its gradient is −c·Σ_i g.
        var yt = DoraOps.dora_output(t, m, n, bias, fused: true);
        yt.sum().backward();
        var expected = m.to(ScalarType.Float64).div(n.to(ScalarType.Float64)).sub(1.0).neg().mul(16);
        AssertClose(bias.grad!, expected, 2e-2, 2e-2, "dbias");
    }
}
