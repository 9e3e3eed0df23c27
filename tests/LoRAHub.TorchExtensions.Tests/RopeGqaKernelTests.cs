using LoRAHub.TorchExtensions.Cuda;

namespace LoRAHub.TorchExtensions.Tests;

using FX = torchx.nn.functional;

/// <summary>
/// rotary_embedding_gqa (q, k rotated; k, v repeated to the query heads) and the per-token rope kernels behind it and
/// behind rotary_embedding: the composite path against per-head rotation on every device; on CUDA the kernels against
/// the composite path and against an fp32 reference rounded once (forward and gradients), fp32, bf16 and fp16, with
/// launch counts so a silent fallback fails.
/// </summary>
[Collection(KernelTestsCollection.Name)]
public class RopeGqaKernelTests
{
    private static readonly Device Dev = TestDevice.Current;
    private static readonly Device Cuda = new(DeviceType.CUDA, 0);
    private static readonly ScalarType[] KernelTypes = [ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16];

    private static (Tensor cos, Tensor sin) Tables(long positions, long headDim, Device device, double theta = 10000)
    {
        var inv = Enumerable.Range(0, (int)headDim / 2).Select(i => (float)(1.0 / Math.Pow(theta, 2.0 * i / headDim))).ToArray();
        var freqs = outer(arange(0, positions, 1, ScalarType.Float32, device), tensor(inv, device: device));
        var emb = cat([freqs, freqs], -1);
        return (emb.cos(), emb.sin());
    }

    // Per-position tables (batch, seq, head_dim) for positions restarting inside each row, as packed rows have.
    private static (Tensor cos, Tensor sin) PackedTables(long batch, long seq, long headDim, Device device)
    {
        var (cos, sin) = Tables(seq, headDim, device);
        var positions = arange(0, batch * seq, 1, ScalarType.Int64, device).remainder(seq / 2 + 1).view(batch, seq);
        var flat = positions.reshape(-1);
        return (cos.index_select(0, flat).view(batch, seq, headDim), sin.index_select(0, flat).view(batch, seq, headDim));
    }

    // x·cos + rotate_half(x)·sin in fp64 on the CPU, tables broadcast over heads: the definition, not the code under test.
    private static Tensor Rotate64(Tensor x, Tensor cos, Tensor sin)
    {
        var x64 = x.detach().cpu().to(ScalarType.Float64);
        var (c, s) = (cos.cpu().to(ScalarType.Float64), sin.cpu().to(ScalarType.Float64));
        if (c.dim() == 3) (c, s) = (c.unsqueeze(1), s.unsqueeze(1));
        var half = x64.size(-1) / 2;
        var rotated = cat([x64.narrow(-1, half, half).neg(), x64.narrow(-1, 0, half)], -1);
        return x64 * c + rotated * s;
    }

    private static Tensor Repeat(Tensor x, long groups) =>
        x.unsqueeze(2).expand(x.size(0), x.size(1), groups, x.size(2), x.size(3)).reshape(x.size(0), x.size(1) * groups, x.size(2), x.size(3));

    // ---------------------------------------------------------------- composite path, every device

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Composite_rotates_q_and_k_and_repeats_k_and_v(bool packed)
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(5);
        long b = 2, t = 6, h = 4, kvh = 2, d = 8;
        var (cos, sin) = packed ? PackedTables(b, t, d, Dev) : Tables(t, d, Dev);
        var q = randn([b, h, t, d], ScalarType.Float32, Dev);
        var k = randn([b, kvh, t, d], ScalarType.Float32, Dev);
        var v = randn([b, kvh, t, d], ScalarType.Float32, Dev);
        var (qr, kr, vr) = FX.rotary_embedding_gqa(q, k, v, cos, sin, fused: false);
        Assert.Equal(new[] { b, h, t, d }, qr.shape);
        Assert.Equal(new[] { b, h, t, d }, kr.shape);
        FusedKernelTests.AssertClose(qr, Rotate64(q, cos, sin), 1e-6, 1e-6, "q");
        FusedKernelTests.AssertClose(kr, Repeat(Rotate64(k, cos, sin), 2), 1e-6, 1e-6, "k");
        Assert.Equal(0.0, (vr.cpu() - Repeat(v.cpu(), 2)).abs().max().item<float>());
        // Query head 3 uses kv head 1 (= 3 / 2), as transformers' repeat_kv.
        Assert.Equal(0.0, (vr.select(1, 3) - v.select(1, 1)).abs().max().item<float>());
    }

    [Fact]
    public void Equal_head_counts_rotate_k_and_return_v_itself()
    {
        using var scope = NewDisposeScope();
        var (cos, sin) = Tables(3, 4, Dev);
        var q = randn([1, 2, 3, 4], ScalarType.Float32, Dev);
        var k = randn([1, 2, 3, 4], ScalarType.Float32, Dev);
        var v = randn([1, 2, 3, 4], ScalarType.Float32, Dev);
        foreach (var fused in new[] { false, true })
        {
            var (_, kr, vr) = FX.rotary_embedding_gqa(q, k, v, cos, sin, fused);
            Assert.Same(v, vr);
            FusedKernelTests.AssertClose(kr, Rotate64(k, cos, sin), 1e-5, 1e-6, $"k (fused {fused})");
        }
    }

    [Fact]
    public void Grouped_heads_left_grouped_on_the_composite_path_rotate_k_and_return_v_itself()
    {
        using var scope = NewDisposeScope();
        var (cos, sin) = Tables(5, 8, Dev);
        var q = randn([2, 4, 5, 8], ScalarType.Float32, Dev);
        var k = randn([2, 2, 5, 8], ScalarType.Float32, Dev);
        var v = randn([2, 2, 5, 8], ScalarType.Float32, Dev);
        var (qr, kr, vr) = FX.rotary_embedding_gqa(q, k, v, cos, sin, fused: false, repeat: false);
        Assert.Same(v, vr);
        FusedKernelTests.AssertClose(qr, Rotate64(q, cos, sin), 1e-6, 1e-6, "q");
        FusedKernelTests.AssertClose(kr, Rotate64(k, cos, sin), 1e-6, 1e-6, "k");
    }

    [Fact]
    public void Rejects_mismatched_shapes()
    {
        using var scope = NewDisposeScope();
        var (cos, sin) = Tables(3, 4, Dev);
        var q = randn([1, 4, 3, 4], ScalarType.Float32, Dev);
        var k3 = randn([1, 3, 3, 4], ScalarType.Float32, Dev);
        var k2 = randn([1, 2, 3, 4], ScalarType.Float32, Dev);
        Assert.ThrowsAny<TorchException>(() => FX.rotary_embedding_gqa(q, k3, k3, cos, sin)); // 4 heads over 3
        Assert.ThrowsAny<TorchException>(() => FX.rotary_embedding_gqa(q, k2, k2.narrow(2, 0, 2), cos, sin)); // v shorter
        var (c5, s5) = Tables(5, 4, Dev);
        Assert.ThrowsAny<TorchException>(() => FX.rotary_embedding_gqa(q, k2, k2, c5, s5)); // 5 positions for 3
    }

    // ---------------------------------------------------------------- CUDA kernels

    private static bool RequireKernels()
    {
        if (!cuda.is_available()) return false;
        Assert.True(CudaKernels.Available, $"CUDA is available but LoRAHub's kernels are not: {CudaKernels.UnavailableReason}");
        Assert.True(RopeGqaKernels.Available(zeros([1], ScalarType.BFloat16, Cuda)), $"the rope/GQA kernels are off: {RopeGqaKernels.CompileFailure}");
        return true;
    }

    // Kernel against (a) the composite path in the same dtype, loosely (it rounds the group sum once more), and (b) an
    // fp32 computation of the same math rounded once at the end, to within one rounding of the dtype.
    private static void AssertKernelClose(Tensor actual, Tensor composite, Tensor reference32, ScalarType dtype, string what)
    {
        var (rtol, atol) = dtype switch
        {
            ScalarType.Float32 => (1e-5, 1e-5),
            ScalarType.Float16 => (4e-3, 2e-3),
            _ => (2e-2, 1.6e-2),
        };
        FusedKernelTests.AssertClose(actual, composite, rtol, atol, $"{dtype} {what} vs composite");
        var ulp = dtype switch { ScalarType.Float32 => 1e-6, ScalarType.Float16 => 1.0 / 1024, _ => 1.0 / 128 };
        FusedKernelTests.AssertClose(actual, reference32.to(dtype), ulp, 1e-5, $"{dtype} {what} vs fp32 reference");
    }

    public enum Layout
    {
        Projection, // q, k, v as the model makes them: transposed views of (B, T, H, D) projections
        Contiguous, // (B, H, T, D) contiguous
        Fused,      // narrow views of one (B, T, (Hq + 2·Hkv)·D) projection (Phi-3's qkv_proj, the fused LoRA block)
    }

    private static (Tensor q, Tensor k, Tensor v, Tensor[] leaves) Inputs(long b, long t, long h, long kvh, long d, ScalarType dtype, Layout layout)
    {
        Tensor Leaf(params long[] shape) => randn(shape, ScalarType.Float32, Cuda).to(dtype).requires_grad_();
        switch (layout)
        {
            case Layout.Projection:
            {
                var (q, k, v) = (Leaf(b, t, h, d), Leaf(b, t, kvh, d), Leaf(b, t, kvh, d));
                return (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), [q, k, v]);
            }
            case Layout.Contiguous:
            {
                var (q, k, v) = (Leaf(b, h, t, d), Leaf(b, kvh, t, d), Leaf(b, kvh, t, d));
                return (q, k, v, [q, k, v]);
            }
            default:
            {
                var qkv = Leaf(b, t, (h + 2 * kvh) * d);
                var q = qkv.narrow(-1, 0, h * d).view(b, t, h, d).transpose(1, 2);
                var k = qkv.narrow(-1, h * d, kvh * d).view(b, t, kvh, d).transpose(1, 2);
                var v = qkv.narrow(-1, (h + kvh) * d, kvh * d).view(b, t, kvh, d).transpose(1, 2);
                return (q, k, v, [qkv]);
            }
        }
    }

    [Theory]
    [InlineData(2, 128, 32, 8, 64, Layout.Projection, false)] // llama-1b's heads
    [InlineData(1, 33, 4, 4, 128, Layout.Projection, false)]  // equal head counts: q and k only
    [InlineData(2, 17, 8, 2, 64, Layout.Contiguous, false)]
    [InlineData(2, 9, 6, 2, 32, Layout.Fused, false)]
    [InlineData(2, 16, 8, 4, 64, Layout.Projection, true)]   // packed rows: tables per (row, position)
    [InlineData(2, 5, 6, 3, 6, Layout.Projection, false)]    // half of head_dim not a multiple of the vector width: scalar kernel
    [InlineData(3, 7, 4, 1, 10, Layout.Contiguous, true)]    // one kv head, scalar kernel, packed tables
    public void Kernel_matches_composite_forward_and_backward(int b, int t, int h, int kvh, int d, Layout layout, bool packed)
    {
        if (!RequireKernels()) return;
        foreach (var dtype in KernelTypes)
        {
            using var scope = NewDisposeScope();
            torchx.manual_seed(b * 1000 + t * 10 + h + d);
            var (cos, sin) = packed ? PackedTables(b, t, d, Cuda) : Tables(t, d, Cuda, 500000);
            var dq = randn([b, h, t, d], ScalarType.Float32, Cuda).to(dtype);
            var dk = randn([b, h, t, d], ScalarType.Float32, Cuda).to(dtype);
            var dv = randn([b, h, t, d], ScalarType.Float32, Cuda).to(dtype);
            var (q, k, v, leaves) = Inputs(b, t, h, kvh, d, dtype, layout);
            var results = new List<Tensor[]>();
            foreach (var fused in new[] { false, true })
            {
                foreach (var leaf in leaves) leaf.grad?.zero_();
                var before = RopeGqaKernels.GqaLaunches;
                var (qr, kr, vr) = FX.rotary_embedding_gqa(q, k, v, cos, sin, fused);
                var loss = (qr.to(ScalarType.Float32) * dq.to(ScalarType.Float32)).sum() + (kr.to(ScalarType.Float32) * dk.to(ScalarType.Float32)).sum() +
                           (vr.to(ScalarType.Float32) * dv.to(ScalarType.Float32)).sum();
                loss.backward();
                if (fused)
                {
                    Assert.Equal(before + 2, RopeGqaKernels.GqaLaunches);
                    // (B, T, H, D) memory: what SDPA reads without a copy.
                    Assert.True(qr.transpose(1, 2).is_contiguous() && kr.transpose(1, 2).is_contiguous(), "outputs are not (B, T, H, D) memory");
                    if (kvh != h) Assert.True(vr.transpose(1, 2).is_contiguous(), "v is not (B, T, H, D) memory");
                }
                Assert.Equal(new long[] { b, h, t, d }, kr.shape);
                Assert.Equal(new long[] { b, h, t, d }, vr.shape);
                results.Add([qr.detach().clone(), kr.detach().clone(), vr.detach().clone(), .. leaves.Select(l => l.grad!.clone())]);
            }
            // The fp32 reference: the same inputs upcast, the composite math in fp32 (group sums in fp32), rounded once.
            var groups = h / kvh;
            var (q32, k32, v32) = (q.detach().to(ScalarType.Float32), k.detach().to(ScalarType.Float32), v.detach().to(ScalarType.Float32));
            var refQ = Rotate64(q32, cos, sin).to(ScalarType.Float32).to(Cuda);
            var refK = Repeat(Rotate64(k32, cos, sin), groups).to(ScalarType.Float32).to(Cuda);
            var refV = Repeat(v32, groups);
            AssertKernelClose(results[1][0], results[0][0], refQ, dtype, "q");
            AssertKernelClose(results[1][1], results[0][1], refK, dtype, "k");
            Assert.Equal(0.0, (results[1][2].to(ScalarType.Float32) - refV).abs().max().item<float>()); // the repeat is a copy
            // Gradients: dq = Rᵀ·dq; dk = Rᵀ·Σ_groups dk; dv = Σ_groups dv (fp32), rounded once.
            var gq = RotateBack32(dq, cos, sin);
            var gk = RotateBack32(dk.to(ScalarType.Float32).view(b, kvh, groups, t, d).sum(2), cos, sin);
            var gv = dv.to(ScalarType.Float32).view(b, kvh, groups, t, d).sum(2);
            var grads32 = layout == Layout.Fused
                ? new[] { cat([gq.transpose(1, 2).reshape(b, t, -1), gk.transpose(1, 2).reshape(b, t, -1), gv.transpose(1, 2).reshape(b, t, -1)], -1) }
                : layout == Layout.Projection
                    ? new[] { gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2) }
                    : new[] { gq, gk, gv };
            for (var i = 0; i < grads32.Length; i++)
                AssertKernelClose(results[1][3 + i], results[0][3 + i], grads32[i], dtype, $"grad {i}");
        }
    }

    // The transpose of the rotation, in fp32 on x's device: dx1 = d1·c1 + d2·s2, dx2 = d2·c2 − d1·s1 (rotation by −angle).
    private static Tensor RotateBack32(Tensor dy, Tensor cos, Tensor sin)
    {
        var g = dy.to(ScalarType.Float32);
        var (c, s) = cos.dim() == 3 ? (cos.unsqueeze(1), sin.unsqueeze(1)) : (cos, sin);
        var half = g.size(-1) / 2;
        var rotated = cat([g.narrow(-1, half, half), g.narrow(-1, 0, half).neg()], -1);
        var swapped = cat([s.narrow(-1, half, half), s.narrow(-1, 0, half)], -1);
        return g * c + rotated * swapped;
    }

    [Fact]
    public void Rope_kernel_per_token_matches_the_older_kernel()
    {
        if (!RequireKernels()) return;
        using var scope = NewDisposeScope();
        torchx.manual_seed(3);
        var (cos, sin) = Tables(64, 64, Cuda, 500000);
        var x0 = randn([2, 64, 8, 64], ScalarType.Float32, Cuda).to(ScalarType.BFloat16);
        var up = randn([2, 8, 64, 64], ScalarType.Float32, Cuda).to(ScalarType.BFloat16);
        var outs = new List<Tensor[]>();
        var enabled = FX.FusedRopeGqa;
        try
        {
            foreach (var perToken in new[] { false, true })
            {
                FX.FusedRopeGqa = perToken;
                var before = RopeGqaKernels.RopeLaunches;
                var leaf = x0.clone().requires_grad_();
                var y = FX.rotary_embedding(leaf.transpose(1, 2), cos, sin, fused: true);
                y.backward([up]);
                Assert.Equal(leaf.transpose(1, 2).stride(), y.stride());
                Assert.Equal(before + (perToken ? 2 : 0), RopeGqaKernels.RopeLaunches);
                outs.Add([y.detach().clone(), leaf.grad!.clone()]);
            }
        }
        finally
        {
            FX.FusedRopeGqa = enabled;
        }
        // Same formula, one rounding each: at most a last-bit difference from a different fused multiply-add.
        FusedKernelTests.AssertClose(outs[1][0], outs[0][0], 1.0 / 128, 1e-5, "y");
        FusedKernelTests.AssertClose(outs[1][1], outs[0][1], 1.0 / 128, 1e-5, "dx");
    }

    // For an attention that takes grouped heads itself: k rotated and v copied with their own heads, one launch each way;
    // the gradients come back side by side (dq, dk, dv in one buffer, for the stacked q/k/v bases), dv bit for bit.
    [Theory]
    [InlineData(Layout.Projection)]
    [InlineData(Layout.Fused)]
    public void Grouped_heads_left_grouped_rotate_k_and_copy_v(Layout layout)
    {
        if (!RequireKernels()) return;
        using var scope = NewDisposeScope();
        torchx.manual_seed(8);
        long b = 2, t = 40, h = 8, kvh = 2, d = 64;
        var dtype = ScalarType.BFloat16;
        var (cos, sin) = Tables(t, d, Cuda);
        var (q, k, v, leaves) = Inputs(b, t, h, kvh, d, dtype, layout);
        var dq = randn([b, h, t, d], ScalarType.Float32, Cuda).to(dtype);
        var dk = randn([b, kvh, t, d], ScalarType.Float32, Cuda).to(dtype);
        var dv = randn([b, kvh, t, d], ScalarType.Float32, Cuda).to(dtype);
        var results = new List<Tensor[]>();
        foreach (var fused in new[] { false, true })
        {
            foreach (var leaf in leaves) leaf.grad?.zero_();
            var before = RopeGqaKernels.GqaLaunches;
            var (qr, kr, vr) = FX.rotary_embedding_gqa(q, k, v, cos, sin, fused, repeat: false);
            Assert.Equal(new long[] { b, kvh, t, d }, kr.shape);
            Assert.Equal(new long[] { b, kvh, t, d }, vr.shape);
            ((qr * dq).sum() + (kr * dk).sum() + (vr * dv).sum()).backward();
            if (fused) Assert.Equal(before + 2, RopeGqaKernels.GqaLaunches);
            results.Add([qr.detach().clone(), kr.detach().clone(), vr.detach().clone(), .. leaves.Select(l => l.grad!.clone())]);
        }
        var refK = Rotate64(k.detach().to(ScalarType.Float32), cos, sin).to(ScalarType.Float32).to(Cuda);
        AssertKernelClose(results[1][1], results[0][1], refK, dtype, "k");
        Assert.Equal(0.0, (results[1][2] - v).abs().max().to(ScalarType.Float32).item<float>());
        var gk = RotateBack32(dk, cos, sin);
        var gv = dv.to(ScalarType.Float32);
        if (layout == Layout.Projection)
        {
            AssertKernelClose(results[1][4], results[0][4], gk.transpose(1, 2), dtype, "grad k");
            Assert.Equal(0.0, (results[1][5].to(ScalarType.Float32) - gv.transpose(1, 2)).abs().max().item<float>());
        }
        else
        {
            var gq = RotateBack32(dq, cos, sin);
            var all = cat([gq.transpose(1, 2).reshape(b, t, -1), gk.transpose(1, 2).reshape(b, t, -1), gv.transpose(1, 2).reshape(b, t, -1)], -1);
            AssertKernelClose(results[1][3], results[0][3], all, dtype, "grad qkv");
        }
    }

    [Fact]
    public void Head_major_kv_layout_gives_the_same_values_and_gradients()
    {
        if (!RequireKernels()) return;
        using var scope = NewDisposeScope();
        torchx.manual_seed(6);
        long b = 2, t = 24, h = 8, kvh = 2, d = 64;
        var (cos, sin) = Tables(t, d, Cuda);
        var (q, k, v, leaves) = Inputs(b, t, h, kvh, d, ScalarType.BFloat16, Layout.Projection);
        var dk = randn([b, h, t, d], ScalarType.Float32, Cuda).to(ScalarType.BFloat16);
        var dv = randn([b, h, t, d], ScalarType.Float32, Cuda).to(ScalarType.BFloat16);
        var outs = new List<Tensor[]>();
        var headMajor = RopeGqaKernels.KvHeadMajor;
        try
        {
            foreach (var major in new[] { false, true })
            {
                RopeGqaKernels.KvHeadMajor = major;
                foreach (var leaf in leaves) leaf.grad?.zero_();
                var (_, kr, vr) = FX.rotary_embedding_gqa(q, k, v, cos, sin, fused: true);
                Assert.Equal(major, kr.is_contiguous() && vr.is_contiguous());
                ((kr * dk).sum() + (vr * dv).sum()).backward();
                outs.Add([kr.detach().clone(), vr.detach().clone(), leaves[1].grad!.clone(), leaves[2].grad!.clone()]);
            }
        }
        finally
        {
            RopeGqaKernels.KvHeadMajor = headMajor;
        }
        for (var i = 0; i < 4; i++) Assert.Equal(0.0, (outs[1][i] - outs[0][i]).abs().max().to(ScalarType.Float32).item<float>());
    }

    [Fact]
    public void Switched_off_takes_the_composite_path_and_no_grad_runs_one_launch()
    {
        if (!RequireKernels()) return;
        using var scope = NewDisposeScope();
        torchx.manual_seed(4);
        var (cos, sin) = Tables(16, 64, Cuda);
        var q = randn([1, 8, 16, 64], ScalarType.BFloat16, Cuda);
        var k = randn([1, 2, 16, 64], ScalarType.BFloat16, Cuda);
        var v = randn([1, 2, 16, 64], ScalarType.BFloat16, Cuda);
        var before = RopeGqaKernels.GqaLaunches;
        Tensor[] on;
        using (no_grad())
        {
            var (a, b, c) = FX.rotary_embedding_gqa(q, k, v, cos, sin, fused: true);
            on = [a, b, c];
        }
        Assert.Equal(before + 1, RopeGqaKernels.GqaLaunches);
        Assert.False(on[0].requires_grad);
        var enabled = FX.FusedRopeGqa;
        try
        {
            FX.FusedRopeGqa = false;
            Assert.False(FX.rotary_embedding_gqa_is_fused(q, cos, sin));
            var (a, b, c) = FX.rotary_embedding_gqa(q, k, v, cos, sin, fused: true);
            Assert.Equal(before + 1, RopeGqaKernels.GqaLaunches);
            FusedKernelTests.AssertClose(on[0], a, 1.0 / 128, 1e-5, "q");
            FusedKernelTests.AssertClose(on[1], b, 1.0 / 128, 1e-5, "k");
            Assert.Equal(0.0, (on[2] - c).abs().max().to(ScalarType.Float32).item<float>());
        }
        finally
        {
            FX.FusedRopeGqa = enabled;
        }
    }
}
