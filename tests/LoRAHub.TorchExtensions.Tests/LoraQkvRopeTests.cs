using LoRAHub.TorchExtensions.Cuda;

namespace LoRAHub.TorchExtensions.Tests;

using FX = torchx.nn.functional;

/// <summary>
/// q/k/v's LoRA updates and DoRA row scales applied inside the rope kernel (<see cref="LoraFusion.TryQkvRope"/>,
/// <see cref="LoraQkvRopeFunction"/>, <see cref="RopeLowRankKernels"/>) against the composite path (each projection as
/// LoRA's layer computes it, then rotary_embedding_gqa's tensor ops): outputs and the gradients of x, A, B and the row
/// scale (m for DoRA's c = m/n), grouped-query and multi-head, fp32 masters with bf16 activations and fp32 throughout,
/// with launch counts so a silent fallback fails. On the CPU the kernel cannot run: the block says why and the caller's
/// other paths run; the deferred q/k/v function (bases and xa out, the updates left to the caller) is checked there too.
/// </summary>
[Collection(KernelTestsCollection.Name)]
public class LoraQkvRopeTests
{
    private static readonly Device Dev = TestDevice.Current;
    private const long Hidden = 64;

    private static (Tensor cos, Tensor sin) Tables(long batch, long seq, long headDim, bool packed)
    {
        var inv = Enumerable.Range(0, (int)headDim / 2).Select(i => (float)(1.0 / Math.Pow(10000, 2.0 * i / headDim))).ToArray();
        var positions = packed
            ? arange(0, batch * seq, 1, ScalarType.Int64).remainder(seq / 2 + 1).to(ScalarType.Float32)
            : arange(0, seq, 1, ScalarType.Float32);
        var freqs = outer(positions, tensor(inv));
        var emb = cat([freqs, freqs], -1);
        var (cos, sin) = (emb.cos(), emb.sin());
        if (packed) (cos, sin) = (cos.view(batch, seq, headDim), sin.view(batch, seq, headDim));
        return (cos.to(Dev), sin.to(Dev));
    }

    // The composite path: the projections as LoRA's layer computes them, then rope and repeat by tensor ops.
    private static Tensor[] Composite(LowRankFixture q, LowRankFixture k, LowRankFixture v, Tensor x, Tensor cos, Tensor sin,
        long heads, long kvHeads, long headDim)
    {
        long b = x.size(0), t = x.size(1);
        var qh = q.call(x).view(b, t, heads, headDim).transpose(1, 2);
        var kh = k.call(x).view(b, t, kvHeads, headDim).transpose(1, 2);
        var vh = v.call(x).view(b, t, kvHeads, headDim).transpose(1, 2);
        var (qr, kr, vr) = FX.rotary_embedding_gqa(qh, kh, vh, cos, sin, fused: false);
        return [qr, kr, vr];
    }

    // The path switched on (default off) until disposed.
    private static IDisposable PathOn()
    {
        var before = RopeLowRankKernels.Enabled;
        RopeLowRankKernels.Enabled = true;
        return new Restore(() => RopeLowRankKernels.Enabled = before);
    }

    private sealed class Restore(Action undo) : IDisposable
    {
        public void Dispose() => undo();
    }

    private static Tensor Loss(Tensor[] outputs, Tensor[] upstream) =>
        outputs.Zip(upstream, (o, d) => (o.to(ScalarType.Float32) * d).sum()).Aggregate((l, r) => l + r);

    [Theory]
    // dtype, heads, kv heads, head_dim, ranks q/k/v (0: no update), row scale (1: c, 2: c = m/n), batch, seq, packed tables
    [InlineData(ScalarType.BFloat16, 8, 2, 16, 16, 16, 16, 0, 2, 40, false)]
    [InlineData(ScalarType.BFloat16, 8, 2, 16, 16, 16, 16, 2, 2, 40, false)]
    [InlineData(ScalarType.BFloat16, 4, 4, 16, 16, 0, 16, 2, 1, 37, false)]
    [InlineData(ScalarType.BFloat16, 8, 2, 16, 8, 16, 64, 1, 2, 33, true)]
    [InlineData(ScalarType.Float16, 8, 4, 16, 32, 32, 32, 2, 3, 20, false)]
    [InlineData(ScalarType.Float32, 8, 2, 16, 16, 16, 16, 2, 2, 40, false)]
    [InlineData(ScalarType.Float32, 4, 4, 6, 8, 8, 0, 0, 1, 9, false)]
    [InlineData(ScalarType.BFloat16, 4, 2, 6, 16, 16, 16, 2, 2, 35, false)]
    public void Fused_matches_the_composite_path(ScalarType dtype, long heads, long kvHeads, long headDim, int rq, int rk, int rv,
        int rowScale, long batch, long seq, bool packed) =>
        AssertSameAsComposite(dtype, heads, kvHeads, headDim, rq, rk, rv, rowScale, batch, seq, packed, plainRopeBackward: true);

    [Theory]
    [InlineData(ScalarType.BFloat16, 8, 2, 16, 16, 16, 16)]
    [InlineData(ScalarType.Float32, 4, 4, 6, 8, 0, 8)]
    public void Without_the_plain_rope_kernel_the_lora_backward_runs_in_this_one(ScalarType dtype, long heads, long kvHeads,
        long headDim, int rq, int rk, int rv)
    {
        var on = FX.FusedRopeGqa;
        FX.FusedRopeGqa = false;
        try
        {
            AssertSameAsComposite(dtype, heads, kvHeads, headDim, rq, rk, rv, 0, 2, 37, false, plainRopeBackward: false);
        }
        finally
        {
            FX.FusedRopeGqa = on;
        }
    }

    [Theory]
    [InlineData(256, 32)]
    [InlineData(128, 32)]
    [InlineData(256, 16)]
    public void Every_launch_shape_matches_the_composite_path(int threads, int tokensPerBlock)
    {
        var before = (RopeLowRankKernels.Threads, RopeLowRankKernels.TokensPerBlock);
        (RopeLowRankKernels.Threads, RopeLowRankKernels.TokensPerBlock) = (threads, tokensPerBlock);
        try
        {
            AssertSameAsComposite(ScalarType.BFloat16, 8, 2, 16, 16, 16, 16, 2, 2, 45, false, plainRopeBackward: true);
        }
        finally
        {
            (RopeLowRankKernels.Threads, RopeLowRankKernels.TokensPerBlock) = before;
        }
    }

    [Theory]
    // dtype, heads, kv heads, head_dim, ranks q/k/v, row scale, seq
    [InlineData(ScalarType.BFloat16, 8, 2, 16, 16, 16, 16, 2, 45)]
    [InlineData(ScalarType.BFloat16, 24, 6, 16, 16, 0, 32, 0, 40)]
    [InlineData(ScalarType.Float16, 4, 4, 16, 32, 32, 32, 1, 19)]
    [InlineData(ScalarType.BFloat16, 4, 2, 32, 16, 16, 16, 2, 33)]
    public void The_tensor_core_kernels_match_the_composite_path(ScalarType dtype, long heads, long kvHeads, long headDim,
        int rq, int rk, int rv, int rowScale, long seq)
    {
        var before = RopeLowRankKernels.MmaLaunches;
        AssertSameAsComposite(dtype, heads, kvHeads, headDim, rq, rk, rv, rowScale, 2, seq, false, plainRopeBackward: true, mma: true);
        Assert.Null(RopeLowRankKernels.MmaCompileFailure);
        // The forward, and DoRA's backward (where a row scale takes its gradient).
        var scaled = rowScale > 0 && new[] { rq, rk, rv }.Any(r => r > 0);
        Assert.Equal(before + (TestDevice.IsCuda ? scaled ? 2 : 1 : 0), RopeLowRankKernels.MmaLaunches);
    }

    // The fp32-dot kernels unless mma (the tensor-core ones where they apply); row scales taken by the path (DoRA) for this call.
    private static void AssertSameAsComposite(ScalarType dtype, long heads, long kvHeads, long headDim, int rq, int rk, int rv,
        int rowScale, long batch, long seq, bool packed, bool plainRopeBackward, bool mma = false)
    {
        var before = (RopeLowRankKernels.Mma, RopeLowRankKernels.RowScales);
        (RopeLowRankKernels.Mma, RopeLowRankKernels.RowScales) = (mma, true);
        using var on = PathOn();
        try
        {
            CompareWithComposite(dtype, heads, kvHeads, headDim, rq, rk, rv, rowScale, batch, seq, packed, plainRopeBackward);
        }
        finally
        {
            (RopeLowRankKernels.Mma, RopeLowRankKernels.RowScales) = before;
        }
    }

    private static void CompareWithComposite(ScalarType dtype, long heads, long kvHeads, long headDim, int rq, int rk, int rv,
        int rowScale, long batch, long seq, bool packed, bool plainRopeBackward)
    {
        var gen = new Generator((ulong)(11 + heads + kvHeads + headDim + rq + rowScale + seq));
        using var q = new LowRankFixture(Hidden, heads * headDim, rq, dtype, gen, rowScale: rowScale > 0 && rq > 0, divided: rowScale == 2);
        using var k = new LowRankFixture(Hidden, kvHeads * headDim, rk, dtype, gen, rowScale: rowScale > 0 && rk > 0, divided: rowScale == 2);
        using var v = new LowRankFixture(Hidden, kvHeads * headDim, rv, dtype, gen, rowScale: rowScale > 0 && rv > 0, divided: rowScale == 2);
        var trainable = q.Trainable().Concat(k.Trainable()).Concat(v.Trainable()).ToList();
        var (cos, sin) = Tables(batch, seq, headDim, packed);
        var block = new FixtureBlock();
        var x0 = randn([batch, seq, Hidden], generator: gen).to(dtype).to(Dev);
        if (!TestDevice.IsCuda)
        {
            // No kernel here: the caller's other paths run, and the block says why.
            Assert.Null(LoraFusion.TryQkvRope(block, q, k, v, x0, cos, sin, heads, kvHeads, headDim));
            Assert.Equal("kernel unavailable", LoraFusion.QkvRopeDeclined);
            return;
        }
        var (launches, gqa, lowRank, blocks) = (RopeLowRankKernels.Launches, RopeGqaKernels.GqaLaunches, LowRankKernels.Launches, LoraFusion.QkvRopeCount);
        var results = new List<(Tensor[] outputs, Tensor dx, Tensor[] grads)>();
        Tensor[]? upstream = null;
        foreach (var fused in new[] { true, false })
        {
            foreach (var p in trainable) p.grad = null;
            var x = x0.detach().clone().requires_grad_(true);
            Tensor[] outputs;
            if (fused)
            {
                var r = LoraFusion.TryQkvRope(block, q, k, v, x, cos, sin, heads, kvHeads, headDim);
                Assert.True(r is not null, $"not fused: {LoraFusion.QkvRopeEpilogue}");
                outputs = [r!.Value.q, r.Value.k, r.Value.v];
            }
            else outputs = Composite(q, k, v, x, cos, sin, heads, kvHeads, headDim);
            upstream ??= outputs.Select(o => randn(o.shape, generator: gen).to(Dev)).ToArray();
            Loss(outputs, upstream).backward();
            results.Add((outputs.Select(o => o.detach()).ToArray(), x.grad!.detach().clone(), trainable.Select(p => p.grad!.detach().clone()).ToArray()));
        }
        Assert.Null(RopeLowRankKernels.CompileFailure);
        // Recorded as the fused q/k/v block, counted as one and as one with the epilogue.
        Assert.Equal("fused", LoraFusionPaths.Of(block));
        Assert.Equal(blocks + 1, LoraFusion.QkvRopeCount);
        // One launch each way: backward by the plain rope kernel where there is no row scale (LoRA), by this one with.
        var plain = plainRopeBackward && !(rowScale > 0 && new[] { rq, rk, rv }.Any(r => r > 0));
        Assert.Equal(launches + (plain ? 1 : 2), RopeLowRankKernels.Launches);
        Assert.Equal(gqa + (plain ? 1 : 0), RopeGqaKernels.GqaLaunches);
        // B's and xa's gradients from one read of d(inner) (column blocks of one buffer) where the kernels take the ranks.
        var kernelRanks = dtype != ScalarType.Float32 && heads * headDim % 8 == 0 && kvHeads * headDim % 8 == 0
            && new[] { rq, rk, rv }.All(r => r == 0 || (r % 16 == 0 && r <= LowRankKernels.FasterUpToRank));
        if (kernelRanks && LowRankKernels.Enabled) Assert.True(LowRankKernels.Launches > lowRank, LowRankKernels.Report);
        var (rtol, atol) = dtype == ScalarType.Float32 ? (1e-4, 1e-4) : (3e-2, 3e-2);
        var (f, c) = (results[0], results[1]);
        string[] names = ["q", "k", "v"];
        for (var i = 0; i < 3; i++)
        {
            Assert.Equal(c.outputs[i].shape, f.outputs[i].shape);
            FusedKernelTests.AssertClose(f.outputs[i], c.outputs[i], rtol, atol, names[i]);
        }
        FusedKernelTests.AssertClose(f.dx, c.dx, rtol, atol, "dx");
        for (var i = 0; i < trainable.Count; i++)
        {
            Assert.Equal(trainable[i].dtype, f.grads[i].dtype);
            FusedKernelTests.AssertClose(f.grads[i], c.grads[i], rtol, atol, $"gradient of trainable tensor {i}");
        }
    }

    [Fact]
    public void Switched_off_it_leaves_the_block_to_the_other_paths_and_says_why()
    {
        var gen = new Generator(3);
        using var q = new LowRankFixture(Hidden, 64, 16, ScalarType.BFloat16, gen);
        using var k = new LowRankFixture(Hidden, 32, 16, ScalarType.BFloat16, gen);
        using var v = new LowRankFixture(Hidden, 32, 16, ScalarType.BFloat16, gen);
        var (cos, sin) = Tables(1, 8, 16, false);
        var block = new FixtureBlock();
        var x = randn([1, 8, Hidden], generator: gen).to(ScalarType.BFloat16).to(Dev);
        var on = RopeLowRankKernels.Enabled;
        RopeLowRankKernels.Enabled = false;
        try
        {
            Assert.Null(LoraFusion.TryQkvRope(block, q, k, v, x, cos, sin, 4, 2, 16));
            Assert.Equal("qkv_rope_epilogue off (LORAHUB_QKV_ROPE_EPILOGUE not 1)", LoraFusion.QkvRopeDeclined);
            Assert.Equal("off (LORAHUB_QKV_ROPE_EPILOGUE not 1)", RopeLowRankKernels.Report);
        }
        finally
        {
            RopeLowRankKernels.Enabled = on;
        }
        // Heads that do not match the projections' widths, and tables of another head_dim.
        using var path = PathOn();
        Assert.Null(LoraFusion.TryQkvRope(block, q, k, v, x, cos, sin, 8, 2, 16));
        Assert.Null(LoraFusionPaths.Of(block));
        var (cos8, sin8) = Tables(1, 8, 8, false);
        Assert.Null(LoraFusion.TryQkvRope(block, q, k, v, x, cos8, sin8, 4, 2, 16));
        Assert.StartsWith("rotary tables", LoraFusion.QkvRopeDeclined);
    }

    [Fact]
    public void A_rank_the_kernel_does_not_take_leaves_the_block_to_the_other_paths()
    {
        if (!TestDevice.IsCuda) return;
        var gen = new Generator(4);
        using var q = new LowRankFixture(Hidden, 64, 12, ScalarType.BFloat16, gen);
        using var k = new LowRankFixture(Hidden, 32, 16, ScalarType.BFloat16, gen);
        using var v = new LowRankFixture(Hidden, 32, 16, ScalarType.BFloat16, gen);
        var (cos, sin) = Tables(1, 8, 16, false);
        var block = new FixtureBlock();
        var x = randn([1, 8, Hidden], generator: gen).to(ScalarType.BFloat16).to(Dev);
        using var path = PathOn();
        Assert.Null(LoraFusion.TryQkvRope(block, q, k, v, x, cos, sin, 4, 2, 16));
        Assert.Equal("q_proj: rank 12", LoraFusion.QkvRopeDeclined);
    }

    [Fact]
    public void A_kernel_that_does_not_compile_turns_off_only_itself()
    {
        var gen = new Generator(5);
        using var q = new LowRankFixture(Hidden, 64, 16, ScalarType.BFloat16, gen, rowScale: true, divided: true);
        using var k = new LowRankFixture(Hidden, 32, 16, ScalarType.BFloat16, gen, rowScale: true, divided: true);
        using var v = new LowRankFixture(Hidden, 32, 16, ScalarType.BFloat16, gen, rowScale: true, divided: true);
        var (cos, sin) = Tables(2, 8, 16, false);
        var block = new FixtureBlock();
        var x = randn([2, 8, Hidden], generator: gen).to(ScalarType.BFloat16).to(Dev);
        using var path = PathOn();
        using (RopeLowRankKernels.UseSource("extern \"C\" __global__ void lh_rope_lr_fwd_bf16_v() { this does not compile }"))
        {
            Assert.Null(LoraFusion.TryQkvRope(block, q, k, v, x, cos, sin, 4, 2, 16));
            if (TestDevice.IsCuda)
            {
                Assert.Equal("kernel did not compile", LoraFusion.QkvRopeDeclined);
                Assert.NotNull(RopeLowRankKernels.CompileFailure);
                Assert.StartsWith("off (did not compile", RopeLowRankKernels.Report);
                // The other kernels still run: the fused q/k/v block and the rope kernel, as before.
                Assert.True(CudaKernels.Available, CudaKernels.UnavailableReason);
                var (qkv, rope) = (LoraFusion.QkvCount, FX.FusedRopeGqaLaunches);
                var r = LoraFusion.TryQkv(block, q, k, v, x);
                Assert.NotNull(r);
                var (qo, ko, vo) = r!.Value;
                FX.rotary_embedding_gqa(qo.view(2, 8, 4, 16).transpose(1, 2), ko.view(2, 8, 2, 16).transpose(1, 2),
                    vo.view(2, 8, 2, 16).transpose(1, 2), cos, sin);
                Assert.Equal(qkv + 1, LoraFusion.QkvCount);
                Assert.True(FX.FusedRopeGqaLaunches > rope, "the rope kernel did not run");
            }
        }
        Assert.Null(RopeLowRankKernels.CompileFailure);
    }

    // LORAHUB_QKV_ROPE_BENCH=FILE: microseconds per call at llama-1b's q/k/v (8192 tokens, 32/8 heads of 64, bf16, rank 16),
    // appended to FILE as lines "qkv-rope-bench ... us=T": this path's forward and backward kernels (LoRA; DoRA with c and
    // dc; 128 and 256 threads) against what they replace (the addmm per projection, the row-scale forward per projection,
    // the rope kernel; the row-scale backward per projection and the rope kernel's backward). Host stopwatch over 30 calls
    // queued back to back. Not a speed assertion: the GPU script reads the numbers.
    [Fact]
    public void Llama_1b_shapes_timed_when_asked()
    {
        var file = Environment.GetEnvironmentVariable("LORAHUB_QKV_ROPE_BENCH");
        if (!TestDevice.IsCuda || string.IsNullOrEmpty(file)) return;
        using var scope = NewDisposeScope();
        const long batch = 4, seq = 2048, tokens = batch * seq, heads = 32, kv = 8, d = 64, r = 16;
        long[] widths = [heads * d, kv * d, kv * d];
        var gen = new Generator(97);
        Tensor R(long[] shape, double scale = 1) => (randn(shape, ScalarType.Float32, generator: gen) * scale).to(ScalarType.BFloat16).to(Dev);
        var bases = R([tokens, widths.Sum()]);
        var xa = R([tokens, 3 * r]);
        var bs = widths.Select(w => R([w, r], 0.1)).ToArray();
        var cs = widths.Select(w => (1 + 0.1 * randn([w], generator: gen)).to(Dev)).ToArray();
        var ns = widths.Select(w => (1 + rand([w], generator: gen)).to(Dev)).ToArray();
        var (cos, sin) = Tables(1, seq, d, false);
        Tensor Dense(long h) => empty_strided([batch, h, seq, d], [seq * h * d, d, h * d, 1], ScalarType.BFloat16, Dev);
        var outs = new[] { Dense(heads), Dense(heads), Dense(heads) };
        Tensor Rows(Tensor o) => o.as_strided([tokens, heads * d], [heads * d, 1]);
        var slice = new Tensor[3];
        long offset = 0;
        for (var z = 0; z < 3; z++)
        {
            slice[z] = bases.narrow(1, offset, widths[z]);
            offset += widths[z];
        }
        var grads = outs.Select(o => R(o.shape)).ToArray();
        var dInner = empty([tokens, widths.Sum()], ScalarType.BFloat16, Dev);
        var dSlice = Enumerable.Range(0, 3).Select(z => dInner.narrow(1, z == 0 ? 0 : z == 1 ? widths[0] : widths[0] + widths[1], widths[z])).ToArray();
        RopeLowRankKernels.Part Fwd(int z, bool dora) =>
            new(slice[z], Rows(outs[z]), null, bs[z], z * r, 2.0, dora ? cs[z] : null, z == 0 ? heads : kv, z == 0 ? 1 : heads / kv);
        RopeLowRankKernels.Part Bwd(int z) =>
            new(grads[z], dSlice[z], slice[z], bs[z], z * r, 2.0, cs[z], z == 0 ? heads : kv, z == 0 ? 1 : heads / kv);
        double Time(Action launch) => KernelTimer.Microseconds(launch, 20);
        var lines = new List<string>();
        var (threads, tokensPerBlock, mma) = (RopeLowRankKernels.Threads, RopeLowRankKernels.TokensPerBlock, RopeLowRankKernels.Mma);
        try
        {
            foreach (var (t, tpb) in new[] { (128, 16), (128, 32) })
            {
                (RopeLowRankKernels.Threads, RopeLowRankKernels.TokensPerBlock, RopeLowRankKernels.Mma) = (t, tpb, false);
                lines.Add($"qkv-rope-bench fwd lora threads={t} tokens={tpb} us={Time(() => RopeLowRankKernels.Forward([Fwd(0, false), Fwd(1, false), Fwd(2, false)], xa, cos, sin, seq)):F1}");
                lines.Add($"qkv-rope-bench fwd dora threads={t} tokens={tpb} us={Time(() => RopeLowRankKernels.Forward([Fwd(0, true), Fwd(1, true), Fwd(2, true)], xa, cos, sin, seq)):F1}");
                lines.Add($"qkv-rope-bench bwd dora+dc threads={t} tokens={tpb} us={Time(() => RopeLowRankKernels.Backward([Bwd(0), Bwd(1), Bwd(2)], xa, cos, sin, seq, ns)):F1}");
                RopeLowRankKernels.Mma = true;
                lines.Add($"qkv-rope-bench fwd lora mma us={Time(() => RopeLowRankKernels.Forward([Fwd(0, false), Fwd(1, false), Fwd(2, false)], xa, cos, sin, seq)):F1} (launches {RopeLowRankKernels.MmaLaunches})");
                lines.Add($"qkv-rope-bench fwd dora mma us={Time(() => RopeLowRankKernels.Forward([Fwd(0, true), Fwd(1, true), Fwd(2, true)], xa, cos, sin, seq)):F1}");
                lines.Add($"qkv-rope-bench bwd dora+dc mma us={Time(() => RopeLowRankKernels.Backward([Bwd(0), Bwd(1), Bwd(2)], xa, cos, sin, seq, ns)):F1}");
                RopeLowRankKernels.Mma = false;
                lines.Add($"qkv-rope-bench bwd lora (this kernel) threads={t} tokens={tpb} us={Time(() => RopeLowRankKernels.Backward(Enumerable.Range(0, 3).Select(z => Bwd(z) with { Base = null, C = null }).ToList(), xa, cos, sin, seq, ns)):F1}");
            }
        }
        finally
        {
            (RopeLowRankKernels.Threads, RopeLowRankKernels.TokensPerBlock, RopeLowRankKernels.Mma) = (threads, tokensPerBlock, mma);
        }
        // What the path replaces (the same tensors; values drift, which costs nothing here).
        var q4 = slice[0].view(batch, seq, heads, d).transpose(1, 2);
        var k4 = slice[1].view(batch, seq, kv, d).transpose(1, 2);
        var v4 = slice[2].view(batch, seq, kv, d).transpose(1, 2);
        var ropeFwd = Time(() => RopeGqaKernels.Gqa(q4, outs[0], k4, outs[1], v4, outs[2], cos, sin, heads, kv, heads / kv, backward: false));
        var addmm = Time(() =>
        {
            for (var z = 0; z < 3; z++) torchx.addmm_(slice[z], xa.narrow(1, z * r, r), bs[z].t(), 1, 2.0);
        });
        var scaleFwd = Time(() =>
        {
            for (var z = 0; z < 3; z++) LoraRowScaleKernels.ScaleRows_(slice[z].contiguous(), cs[z], null);
        });
        var contiguous = Time(() =>
        {
            for (var z = 0; z < 3; z++) slice[z].contiguous();
        });
        var dq4 = dSlice.Select((s, z) => s.view(batch, seq, z == 0 ? heads : kv, d).transpose(1, 2)).ToArray();
        var ropeBwd = Time(() => RopeGqaKernels.Gqa(grads[0], dq4[0], grads[1], dq4[1], grads[2], dq4[2], cos, sin, heads, kv, heads / kv,
            backward: true, outTokenStride: widths.Sum()));
        var ys = slice.Select(s => s.contiguous()).ToArray();
        var scaleBwd = Time(() =>
        {
            for (var z = 0; z < 3; z++) LoraRowScaleKernels.RowScaleBackward(ys[z], ys[z], cs[z], null, ns[z]);
        });
        lines.Add($"qkv-rope-bench replaced: rope fwd us={ropeFwd:F1}; 3 addmm us={addmm:F1}; 3 rowscale fwd us={scaleFwd - contiguous:F1} " +
            $"(copies subtracted); rope bwd (column blocks) us={ropeBwd:F1}; 3 rowscale bwd + dc us={scaleBwd:F1}");
        File.AppendAllLines(file, lines);
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void The_deferred_qkv_function_leaves_exactly_the_updates_to_its_caller(ScalarType dtype)
    {
        // Bases and xa from the deferred function, the updates added by tensor ops: the plain fused function's results.
        var gen = new Generator(6);
        using var q = new LowRankFixture(Hidden, 32, 8, dtype, gen);
        using var k = new LowRankFixture(Hidden, 16, 0, dtype, gen);
        using var v = new LowRankFixture(Hidden, 16, 16, dtype, gen);
        LowRankFixture[] modules = [q, k, v];
        var parts = modules.Select(m => m.low_rank_parts(out _)!).ToArray();
        var trainable = q.Trainable().Concat(v.Trainable()).ToList();
        var x0 = randn([12, Hidden], generator: gen).to(dtype).to(Dev);
        var upstream = parts.Select(p => randn([12, p.OutFeatures], generator: gen).to(Dev)).ToArray();
        var results = new List<(Tensor[] outputs, Tensor dx, Tensor[] grads)>();
        foreach (var deferred in new[] { true, false })
        {
            foreach (var p in trainable) p.grad = null;
            var x = x0.detach().clone().requires_grad_(true);
            Tensor[] outputs;
            if (deferred)
            {
                var o = new LoraQkvFunction(parts, null, deferred: true).apply(x, parts[0].A, null, parts[1].A, null, parts[2].A, null);
                Assert.Equal(4, o.Length);
                Assert.Equal(parts.Sum(p => p.Rank), o[3].size(1));
                long column = 0;
                outputs = new Tensor[3];
                for (var i = 0; i < 3; i++)
                {
                    outputs[i] = o[i];
                    if (parts[i].B is not { } b) continue;
                    var xa = o[3].narrow(1, column, parts[i].Rank);
                    outputs[i] = o[i] + parts[i].Scaling * xa.mm(b.to(dtype).t());
                    column += parts[i].Rank;
                }
            }
            else outputs = new LoraQkvFunction(parts).apply(x, parts[0].A, parts[0].B, parts[1].A, parts[1].B, parts[2].A, parts[2].B);
            Loss(outputs, upstream).backward();
            results.Add((outputs.Select(o => o.detach()).ToArray(), x.grad!.detach().clone(), trainable.Select(p => p.grad!.detach().clone()).ToArray()));
        }
        var (rtol, atol) = dtype == ScalarType.Float32 ? (1e-5, 1e-5) : (3e-2, 3e-2);
        for (var i = 0; i < 3; i++) FusedKernelTests.AssertClose(results[0].outputs[i], results[1].outputs[i], rtol, atol, $"output {i}");
        FusedKernelTests.AssertClose(results[0].dx, results[1].dx, rtol, atol, "dx");
        for (var i = 0; i < trainable.Count; i++)
            FusedKernelTests.AssertClose(results[0].grads[i], results[1].grads[i], rtol, atol, $"gradient of trainable tensor {i}");
    }
}
