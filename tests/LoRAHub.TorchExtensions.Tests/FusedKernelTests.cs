using LoRAHub.TorchExtensions.Cuda;
using LoRAHub.TorchExtensions.Modules;

namespace LoRAHub.TorchExtensions.Tests;

using FX = torchx.nn.functional;

// Alone, after the parallel classes: these tests reseed the global generators, which would change the random streams of
// tests that replay them (the checkpoint/dropout test) if they ran at the same time, and they count kernel launches,
// which are process-wide (the optimizer, quantization and paged-state tests share the collection).
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class KernelTestsCollection
{
    public const string Name = "KernelTests";
}

/// <summary>
/// The fused Llama-block ops (RMSNorm, SwiGLU, rotary embedding, grouped-query attention): the composite path against
/// hand-computed values (every device), and where CUDA is available the NVRTC-compiled kernels against the composite
/// path, forward and backward, in fp32, fp16 and bf16, with a launch count so a silent fallback fails.
/// </summary>
[Collection(KernelTestsCollection.Name)]
public class FusedKernelTests
{
    private static readonly Device Dev = TestDevice.Current;
    private static readonly Device Cuda = new(DeviceType.CUDA, 0);

    internal static float[] Values(Tensor t) => t.detach().cpu().to(ScalarType.Float32).contiguous().data<float>().ToArray();

    // |a − b| ≤ atol + rtol·|b| elementwise, with atol relative to b's largest magnitude (gradients vary in scale).
    internal static void AssertClose(Tensor actual, Tensor expected, double rtol, double atolScale, string what)
    {
        Assert.Equal(expected.shape, actual.shape);
        var a = Values(actual);
        var b = Values(expected);
        var scale = b.Length == 0 ? 0 : b.Max(v => Math.Abs(v));
        var atol = atolScale * Math.Max(scale, 1e-6);
        var worst = 0.0;
        var at = -1;
        for (var i = 0; i < a.Length; i++)
        {
            Assert.False(float.IsNaN(a[i]), $"{what}: NaN at {i}");
            var excess = Math.Abs(a[i] - b[i]) - (atol + rtol * Math.Abs(b[i]));
            if (excess > worst)
            {
                worst = excess;
                at = i;
            }
        }
        Assert.True(at < 0, at < 0 ? "" : $"{what}: element {at} is {a[at]}, expected {b[at]} (scale {scale})");
    }

    private static (double rtol, double atol) Tolerance(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => (1e-5, 1e-5),
        ScalarType.Float16 => (4e-3, 2e-3),
        _ => (2e-2, 1.6e-2),
    };

    // ---------------------------------------------------------------- composite path, known values

    [Fact]
    public void RmsNorm_matches_hand_computed_values_and_gradients()
    {
        using var scope = NewDisposeScope();
        double[] xs = [1, -2, 3, 4, 0.5, 0.25, -1, 2];
        double[] ws = [1, 0.5, 2, -1];
        var x = tensor(xs.Select(v => (float)v).ToArray(), [2, 4], device: Dev, requires_grad: true);
        var w = tensor(ws.Select(v => (float)v).ToArray(), [4], device: Dev, requires_grad: true);
        const double eps = 1e-6;
        var y = FX.rms_norm(x, w, eps, fused: false);
        var upstream = tensor(new[] { 1f, 2f, -1f, 0.5f, -0.5f, 1f, 3f, 1f }, [2, 4], device: Dev);
        (y * upstream).sum().backward();

        var expectedY = new double[8];
        var expectedDx = new double[8];
        var expectedDw = new double[4];
        var dy = Values(upstream);
        for (var r = 0; r < 2; r++)
        {
            var row = xs.Skip(r * 4).Take(4).ToArray();
            var rstd = 1 / Math.Sqrt(row.Sum(v => v * v) / 4 + eps);
            var dot = 0.0;
            for (var j = 0; j < 4; j++) dot += dy[r * 4 + j] * ws[j] * row[j] * rstd;
            for (var j = 0; j < 4; j++)
            {
                expectedY[r * 4 + j] = ws[j] * row[j] * rstd;
                expectedDx[r * 4 + j] = rstd * (dy[r * 4 + j] * ws[j] - row[j] * rstd * dot / 4);
                expectedDw[j] += dy[r * 4 + j] * row[j] * rstd;
            }
        }
        AssertClose(y, tensor(expectedY.Select(v => (float)v).ToArray(), [2, 4]), 1e-5, 1e-6, "y");
        AssertClose(x.grad!, tensor(expectedDx.Select(v => (float)v).ToArray(), [2, 4]), 1e-4, 1e-6, "dx");
        AssertClose(w.grad!, tensor(expectedDw.Select(v => (float)v).ToArray(), [4]), 1e-4, 1e-6, "dw");
    }

    [Fact]
    public void RmsNorm_rounds_like_transformers_in_bf16()
    {
        // Normalise in fp32, round to the input dtype, then multiply by the weight (one more rounding).
        using var scope = NewDisposeScope();
        torchx.manual_seed(5);
        var x = randn([3, 64], ScalarType.BFloat16, Dev);
        var w = (randn([64], ScalarType.Float32, Dev) * 0.1 + 1).to(ScalarType.BFloat16);
        var x32 = x.to(ScalarType.Float32);
        var normed = (x32 * (x32.pow(2).mean([-1], keepdim: true) + 1e-6).rsqrt()).to(ScalarType.BFloat16);
        var expected = w * normed;
        var y = FX.rms_norm(x, w, 1e-6, fused: false);
        Assert.Equal(ScalarType.BFloat16, y.dtype);
        Assert.True(Exact.Equal(y, expected));
    }

    [Fact]
    public void RMSNorm_module_has_a_weight_and_normalises_the_last_dimension()
    {
        using var scope = NewDisposeScope();
        using var norm = torchx.nn.RMSNorm(4, eps: 1e-5, device: Dev);
        Assert.Equal(["weight"], norm.named_parameters().Select(p => p.name));
        Assert.Equal(new long[] { 4 }, norm.weight.shape);
        Assert.True(norm.weight.requires_grad);
        using (no_grad()) norm.weight.copy_(tensor(new[] { 1f, 2f, 3f, 4f }, device: Dev));
        var x = tensor(new[] { 1f, 1f, 1f, 1f, 2f, -2f, 2f, -2f }, [2, 4], device: Dev);
        var y = norm.forward(x);
        // Each row has RMS |x|, so x / rms is ±1 and y = ±weight.
        Assert.Equal([1f, 2f, 3f, 4f, 1f, -2f, 3f, -4f], Values(y).Select(v => MathF.Round(v, 4)));
        Assert.True(Exact.Equal(y, FX.rms_norm(x, norm.weight, 1e-5)));
    }

    [Fact]
    public void SwiGlu_matches_hand_computed_values_and_gradients()
    {
        using var scope = NewDisposeScope();
        float[] gs = [-2f, -0.5f, 0f, 0.75f, 3f];
        float[] us = [1f, -2f, 4f, 0.5f, -1f];
        var g = tensor(gs, [5], device: Dev, requires_grad: true);
        var u = tensor(us, [5], device: Dev, requires_grad: true);
        var y = FX.swiglu(g, u, fused: false);
        y.sum().backward();
        static double Sig(double v) => 1 / (1 + Math.Exp(-v));
        var ey = gs.Select((v, i) => (float)(v * Sig(v) * us[i])).ToArray();
        var edg = gs.Select((v, i) => (float)(us[i] * Sig(v) * (1 + v * (1 - Sig(v))))).ToArray();
        var edu = gs.Select(v => (float)(v * Sig(v))).ToArray();
        AssertClose(y, tensor(ey, [5]), 1e-5, 1e-6, "y");
        AssertClose(g.grad!, tensor(edg, [5]), 1e-5, 1e-6, "dg");
        AssertClose(u.grad!, tensor(edu, [5]), 1e-5, 1e-6, "du");
    }

    private static (Tensor cos, Tensor sin) RopeTables(long positions, long headDim, Device device, double theta = 10000)
    {
        var inv = Enumerable.Range(0, (int)headDim / 2).Select(i => (float)(1.0 / Math.Pow(theta, 2.0 * i / headDim))).ToArray();
        var freqs = outer(arange(0, positions, 1, ScalarType.Float32, device), tensor(inv, device: device));
        var emb = cat([freqs, freqs], -1);
        return (emb.cos(), emb.sin());
    }

    [Fact]
    public void Rope_matches_hand_computed_rotation_and_its_transpose()
    {
        using var scope = NewDisposeScope();
        // One head, two positions, head_dim 4: pairs (x0, x2) and (x1, x3) rotate by position · frequency.
        float[] xs = [1f, 2f, 3f, 4f, -1f, 0.5f, 2f, -3f];
        var x = tensor(xs, [1, 1, 2, 4], device: Dev, requires_grad: true);
        var (cos, sin) = RopeTables(2, 4, Dev);
        var y = FX.rotary_embedding(x, cos, sin, fused: false);
        var upstream = tensor(new[] { 0.5f, -1f, 2f, 1f, 1f, 1f, -2f, 0.25f }, [1, 1, 2, 4], device: Dev);
        (y * upstream).sum().backward();
        double[] freq = [1.0, 1.0 / 100]; // 1/10000^(0/4), 1/10000^(2/4)
        var ey = new float[8];
        var edx = new float[8];
        var dy = Values(upstream);
        for (var t = 0; t < 2; t++)
            for (var i = 0; i < 2; i++)
            {
                double c = Math.Cos(t * freq[i]), s = Math.Sin(t * freq[i]);
                double a = xs[t * 4 + i], b = xs[t * 4 + i + 2];
                ey[t * 4 + i] = (float)(a * c - b * s);
                ey[t * 4 + i + 2] = (float)(b * c + a * s);
                double da = dy[t * 4 + i], db = dy[t * 4 + i + 2];
                edx[t * 4 + i] = (float)(da * c + db * s);
                edx[t * 4 + i + 2] = (float)(db * c - da * s);
            }
        AssertClose(y, tensor(ey, [1, 1, 2, 4]), 1e-5, 1e-6, "y");
        AssertClose(x.grad!, tensor(edx, [1, 1, 2, 4]), 1e-5, 1e-6, "dx");
    }

    // Both GQA paths (k/v repeated for one SDPA call, the default; query heads split into groups, Fused.Gqa) against
    // attention over heads expanded by hand.
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Grouped_query_attention_equals_attention_over_expanded_heads(bool split)
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(11);
        var q = randn([2, 6, 5, 8], ScalarType.Float32, Dev, requires_grad: true);
        var k = randn([2, 2, 5, 8], ScalarType.Float32, Dev, requires_grad: true);
        var v = randn([2, 2, 5, 8], ScalarType.Float32, Dev, requires_grad: true);
        var upstream = randn([2, 6, 5, 8], ScalarType.Float32, Dev);
        Tensor y;
        var gqa = FX.Fused.Gqa;
        try
        {
            FX.Fused.Gqa = split;
            y = FX.scaled_dot_product_attention(q, k, v, is_causal: true, enable_gqa: true);
            (y * upstream).sum().backward();
        }
        finally
        {
            FX.Fused.Gqa = gqa;
        }
        var (dq, dk, dv) = (q.grad!.clone(), k.grad!.clone(), v.grad!.clone());

        var q2 = q.detach().clone().requires_grad_();
        var k2 = k.detach().clone().requires_grad_();
        var v2 = v.detach().clone().requires_grad_();
        var ke = k2.unsqueeze(2).expand(2, 2, 3, 5, 8).reshape(2, 6, 5, 8);
        var ve = v2.unsqueeze(2).expand(2, 2, 3, 5, 8).reshape(2, 6, 5, 8);
        var y2 = FX.scaled_dot_product_attention(q2, ke, ve, is_causal: true);
        (y2 * upstream).sum().backward();
        AssertClose(y, y2, 1e-5, 1e-5, "y");
        AssertClose(dq, q2.grad!, 1e-4, 1e-5, "dq");
        AssertClose(dk, k2.grad!, 1e-4, 1e-5, "dk");
        AssertClose(dv, v2.grad!, 1e-4, 1e-5, "dv");
    }

    [Fact]
    public void Bad_shapes_raise_clear_errors()
    {
        using var scope = NewDisposeScope();
        var x = randn([2, 8], ScalarType.Float32, Dev);
        var ex = Assert.ThrowsAny<TorchException>(() => FX.rms_norm(x, ones([7], ScalarType.Float32, Dev)));
        Assert.Contains("does not match", ex.Message);
        Assert.ThrowsAny<TorchException>(() => FX.swiglu(x, randn([2, 7], ScalarType.Float32, Dev)));
        Assert.ThrowsAny<TorchException>(() => FX.swiglu(x, x.to(ScalarType.Float64)));
        var q = randn([1, 2, 3, 4], ScalarType.Float32, Dev);
        var (cos, sin) = RopeTables(5, 4, Dev);
        Assert.ThrowsAny<TorchException>(() => FX.rotary_embedding(q, cos, sin)); // 5 positions for 3
        Assert.ThrowsAny<TorchException>(() => FX.rotary_embedding(x, cos, sin)); // not 4-D
        var (c3, s3) = RopeTables(3, 4, Dev);
        Assert.ThrowsAny<TorchException>(() => FX.rotary_embedding(randn([1, 2, 3, 5], ScalarType.Float32, Dev), c3, s3));
        var q6 = randn([1, 6, 3, 4], ScalarType.Float32, Dev);
        var k4 = randn([1, 4, 3, 4], ScalarType.Float32, Dev);
        var gqa = Assert.ThrowsAny<ArgumentException>(() => FX.scaled_dot_product_attention(q6, k4, k4, enable_gqa: true));
        Assert.Contains("multiple", gqa.Message);
    }

    [Fact]
    public void Without_usable_kernels_the_fused_switch_runs_the_composite_ops()
    {
        // CPU tensors (and fp64 anywhere) never reach a kernel: the launch count stays, the result is the composite one.
        using var scope = NewDisposeScope();
        torchx.manual_seed(2);
        var x = randn([3, 16], ScalarType.Float64);
        var w = randn([16], ScalarType.Float64);
        var before = FX.Fused.LaunchCount;
        var y = FX.rms_norm(x, w, 1e-6, fused: true);
        var s = FX.swiglu(x, x, fused: true);
        Assert.Equal(before, FX.Fused.LaunchCount);
        Assert.True(Exact.Equal(y, FX.rms_norm(x, w, 1e-6, fused: false)));
        Assert.True(Exact.Equal(s, FX.swiglu(x, x, fused: false)));
        if (!FX.Fused.KernelsAvailable)
            Assert.False(string.IsNullOrWhiteSpace(FX.Fused.UnavailableReason), "unavailable kernels must say why");
        Assert.False(string.IsNullOrWhiteSpace(CudaKernels.Describe()));
    }

    // ---------------------------------------------------------------- NVRTC kernels against the composite path (CUDA)

    private static readonly ScalarType[] KernelTypes = [ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16];

    private static bool RequireKernels()
    {
        if (!cuda.is_available()) return false;
        Assert.True(CudaKernels.Available, $"CUDA is available but LoRAHub's kernels are not: {CudaKernels.UnavailableReason}");
        return true;
    }

    [Theory]
    [InlineData(4, 2048, true)]
    [InlineData(3, 4096, false)]
    [InlineData(5, 8192, true)]
    [InlineData(7, 100, true)] // not a multiple of the vector width: the scalar kernel
    public void Fused_rms_norm_matches_composite(int rows, int cols, bool weightGrad)
    {
        if (!RequireKernels()) return;
        foreach (var dtype in KernelTypes)
        {
            using var scope = NewDisposeScope();
            torchx.manual_seed(rows * 1000 + cols);
            var x0 = (randn([rows, 3, cols], ScalarType.Float32, Cuda) * 2).to(dtype);
            var w0 = (randn([cols], ScalarType.Float32, Cuda) * 0.2 + 1).to(dtype);
            var upstream = randn([rows, 3, cols], ScalarType.Float32, Cuda).to(dtype);
            var results = new List<(Tensor y, Tensor dx, Tensor? dw)>();
            foreach (var fused in new[] { false, true })
            {
                var x = x0.clone().requires_grad_();
                var w = w0.clone().requires_grad_(weightGrad);
                var before = FX.Fused.LaunchCount;
                var y = FX.rms_norm(x, w, 1e-6, fused);
                y.backward([upstream]);
                if (fused) Assert.True(FX.Fused.LaunchCount >= before + (weightGrad ? 3 : 2), "the fused RMSNorm kernels did not run");
                Assert.Equal(dtype, y.dtype);
                results.Add((y, x.grad!, weightGrad ? w.grad! : null));
            }
            var (rtol, atol) = Tolerance(dtype);
            AssertClose(results[1].y, results[0].y, rtol, atol, $"{dtype} y");
            AssertClose(results[1].dx, results[0].dx, rtol, atol, $"{dtype} dx");
            if (weightGrad) AssertClose(results[1].dw!, results[0].dw!, rtol, atol, $"{dtype} dw");
        }
    }

    [Theory]
    [InlineData(4, 37, 256)]
    [InlineData(3, 7, 5)] // odd sizes: the scalar kernel
    public void Fused_swiglu_matches_composite(int a, int b, int c)
    {
        if (!RequireKernels()) return;
        foreach (var dtype in KernelTypes)
        {
            using var scope = NewDisposeScope();
            torchx.manual_seed(a + b + c);
            var g0 = (randn([a, b, c], ScalarType.Float32, Cuda) * 3).to(dtype);
            var u0 = randn([a, b, c], ScalarType.Float32, Cuda).to(dtype);
            var upstream = randn([a, b, c], ScalarType.Float32, Cuda).to(dtype);
            var results = new List<Tensor[]>();
            foreach (var fused in new[] { false, true })
            {
                var g = g0.clone().requires_grad_();
                var u = u0.clone().requires_grad_();
                var before = FX.Fused.LaunchCount;
                var y = FX.swiglu(g, u, fused);
                y.backward([upstream]);
                if (fused) Assert.True(FX.Fused.LaunchCount >= before + 2, "the fused SwiGLU kernels did not run");
                results.Add([y, g.grad!, u.grad!]);
            }
            var (rtol, atol) = Tolerance(dtype);
            string[] names = ["y", "dgate", "dup"];
            for (var i = 0; i < 3; i++) AssertClose(results[1][i], results[0][i], rtol, atol, $"{dtype} {names[i]}");
        }
    }

    [Theory]
    [InlineData(2, 128, 8, 64, true)]  // q as the model makes it: a transposed view of the projection (B, T, H, D)
    [InlineData(1, 33, 4, 128, false)]
    [InlineData(2, 5, 3, 6, true)]     // half of head_dim not a multiple of the vector width: the scalar kernel
    public void Fused_rope_matches_composite(int batch, int seq, int heads, int headDim, bool transposedView)
    {
        if (!RequireKernels()) return;
        foreach (var dtype in KernelTypes)
        {
            using var scope = NewDisposeScope();
            torchx.manual_seed(seq * headDim);
            var (cos, sin) = RopeTables(seq, headDim, Cuda, 500000);
            var base0 = randn([batch, seq, heads, headDim], ScalarType.Float32, Cuda).to(dtype);
            var upstream = randn([batch, heads, seq, headDim], ScalarType.Float32, Cuda).to(dtype);
            var results = new List<Tensor[]>();
            foreach (var fused in new[] { false, true })
            {
                var leaf = base0.clone().requires_grad_();
                var x = transposedView ? leaf.transpose(1, 2) : leaf.transpose(1, 2).contiguous();
                var before = FX.Fused.LaunchCount;
                var y = FX.rotary_embedding(x, cos, sin, fused);
                y.backward([upstream]);
                if (fused)
                {
                    Assert.True(FX.Fused.LaunchCount >= before + 2, "the fused RoPE kernels did not run");
                    Assert.Equal(x.stride(), y.stride()); // the output keeps x's layout
                }
                results.Add([y, leaf.grad!]);
            }
            var (rtol, atol) = Tolerance(dtype);
            AssertClose(results[1][0], results[0][0], rtol, atol, $"{dtype} y");
            AssertClose(results[1][1], results[0][1], rtol, atol, $"{dtype} dx");
        }
    }

    [Fact]
    public void Fused_ops_under_no_grad_and_with_unused_outputs()
    {
        if (!RequireKernels()) return;
        using var scope = NewDisposeScope();
        torchx.manual_seed(8);
        var x = randn([6, 256], ScalarType.BFloat16, Cuda);
        var w = ones([256], ScalarType.BFloat16, Cuda);
        Tensor y;
        var before = FX.Fused.LaunchCount;
        using (no_grad()) y = FX.rms_norm(x, w, 1e-6, fused: true);
        Assert.Equal(before + 1, FX.Fused.LaunchCount);
        Assert.False(y.requires_grad);
        AssertClose(y, FX.rms_norm(x, w, 1e-6, fused: false), 2e-2, 1.6e-2, "no_grad y");
        // A zero upstream gradient gives a zero input gradient.
        var xr = x.clone().requires_grad_();
        var z = FX.rms_norm(xr, w, 1e-6, fused: true);
        (z.sum() * 0).backward();
        Assert.Equal(0.0, xr.grad!.abs().sum().to(ScalarType.Float32).item<float>());
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Gqa_attention_on_cuda_matches_expanded_heads_in_bf16(bool split)
    {
        if (!cuda.is_available()) return;
        using var scope = NewDisposeScope();
        torchx.manual_seed(21);
        long b = 2, t = 256, h = 8, kvh = 2, d = 64;
        // Drawn on the CPU: manual_seed does not seed the CUDA generator.
        var q0 = randn([b, h, t, d], ScalarType.Float32).to(Cuda).to(ScalarType.BFloat16);
        var k0 = randn([b, kvh, t, d], ScalarType.Float32).to(Cuda).to(ScalarType.BFloat16);
        var v0 = randn([b, kvh, t, d], ScalarType.Float32).to(Cuda).to(ScalarType.BFloat16);
        var upstream = randn([b, h, t, d], ScalarType.Float32).to(Cuda).to(ScalarType.BFloat16);
        var results = new List<Tensor[]>();
        var fusedGqa = FX.Fused.Gqa;
        try
        {
            FX.Fused.Gqa = split; // the grouped call's path: k/v repeated for one SDPA call, or query heads split into groups
            foreach (var gqa in new[] { false, true })
            {
                var q = q0.clone().requires_grad_();
                var k = k0.clone().requires_grad_();
                var v = v0.clone().requires_grad_();
                var (kk, vv) = gqa ? (k, v) : (k.unsqueeze(2).expand(b, kvh, h / kvh, t, d).reshape(b, h, t, d),
                    v.unsqueeze(2).expand(b, kvh, h / kvh, t, d).reshape(b, h, t, d));
                var y = FX.scaled_dot_product_attention(q, kk, vv, is_causal: true, enable_gqa: gqa);
                y.backward([upstream]);
                results.Add([y, q.grad!, k.grad!, v.grad!]);
            }
        }
        finally
        {
            FX.Fused.Gqa = fusedGqa;
        }
        string[] names = ["y", "dq", "dk", "dv"];
        for (var i = 0; i < 4; i++) AssertClose(results[1][i], results[0][i], 2e-2, 1.6e-2, $"bf16 {names[i]} (Fused.Gqa = {split})");
        // The default path is the expanded-heads computation itself: the same output (gradients may differ in the last
        // bit: the flash backward accumulates with atomics).
        if (!split) Assert.True(Exact.Equal(results[1][0], results[0][0]), "bf16 y: repeated k/v must equal expanded heads exactly");
    }
}
