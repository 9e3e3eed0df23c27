namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// DoRA's row-scale kernels (<see cref="LoraRowScaleKernels"/>) against the tensor ops and kernels they replace, where CUDA
/// is there (LORAHUB_TEST_DEVICE=cuda), for every rows-in-flight choice and forward grid: the row-scale forward bit for bit
/// against inner.mul_(c) then inner.add_(b) (what <see cref="LowRankParts.ScaleRows_"/> ran before); the scaled SwiGLU
/// forward and backward (also the one that writes h) bit for bit against the SwiGLU kernels on the scaled inputs, the
/// scales' gradients against fp64 sums; the row-scale backward's d(inner) bit for bit against dy.clone().mul_(c), its dc
/// against the fp64 value of <see cref="LowRankParts.RowScaleGrad"/>'s Σ dy ⊙ (y − b) / c; the scales' gradients with the
/// same bits whatever the rows in flight. On CPU the tensor ops run and nothing launches.
/// </summary>
[Collection(KernelTestsCollection.Name)] // sets the kernels' launch shape and counts their launches (process-wide)
public class LoraRowScaleKernelTests
{
    private static readonly Device Dev = TestDevice.Current;

    // Launch shapes: rows in flight (every choice) × blocks per multiprocessor of the forwards (each kernel's default, 8, 32).
    private static readonly (int rows, int? perSm)[] Shapes = [(1, null), (2, null), (4, null), (1, 8), (4, 32)];

    private static TResult With<TResult>((int rows, int? perSm) shape, Func<TResult> f)
    {
        var (rows, perSm) = (LoraRowScaleKernels.RowsInFlight, LoraRowScaleKernels.ForwardBlocksPerSm);
        LoraRowScaleKernels.RowsInFlight = shape.rows;
        LoraRowScaleKernels.ForwardBlocksPerSm = shape.perSm;
        try
        {
            return f();
        }
        finally
        {
            LoraRowScaleKernels.RowsInFlight = rows;
            LoraRowScaleKernels.ForwardBlocksPerSm = perSm;
        }
    }

    private static byte[] Bits(Tensor t) => t.detach().cpu().contiguous().bytes.ToArray();

    private static void AssertSameBits(Tensor expected, Tensor actual, string what)
    {
        Assert.Equal(expected.dtype, actual.dtype);
        Assert.Equal(expected.shape, actual.shape);
        using var scope = NewDisposeScope();
        var (e, a) = (expected.detach().cpu().contiguous(), actual.detach().cpu().contiguous());
        if (e.bytes.SequenceEqual(a.bytes)) return;
        var (ev, av) = (FusedKernelTests.Values(e.flatten()), FusedKernelTests.Values(a.flatten()));
        var size = (int)(e.bytes.Length / Math.Max(1, e.numel()));
        var at = 0;
        while (!e.bytes.Slice(at * size, size).SequenceEqual(a.bytes.Slice(at * size, size))) at++;
        Assert.Fail($"{what}: element {at} is {av[at]}, expected {ev[at]} (bits differ)");
    }

    // rows × cols normal values times `scale` in dtype, with zeros of both signs, large values and tiny ones (subnormal
    // products) in the first row; `huge`: large enough that products overflow to ±inf, else small enough that SwiGLU's
    // outputs and gradients stay finite (fp16: |h|, |dG| ≈ 3·large² below 65504).
    private static Tensor Activations(long rows, long cols, ScalarType dtype, double scale, Generator gen, bool huge = false)
    {
        var t = randn([rows, cols], generator: gen) * scale;
        var acc = t.data<float>();
        var fp16 = dtype == ScalarType.Float16;
        float large = huge ? fp16 ? 60000f : 3e38f : fp16 ? 100f : 300f, tiny = fp16 ? 1e-7f : 2e-38f;
        float[] special = [0f, -0f, large, -large, tiny, -tiny];
        for (var i = 0; i < Math.Min(cols, special.Length); i++) acc[0, i] = special[i];
        return t.to(dtype).to(Dev);
    }

    // Per-column scales in [0.25, 1.75) with one 0 and one negative (c = m/‖V‖ may be either).
    private static Tensor Scales(long cols, ScalarType dtype, Generator gen)
    {
        var c = rand([cols], generator: gen) * 1.5 + 0.25;
        var acc = c.data<float>();
        acc[cols - 1] = 0f;
        acc[cols / 2] = -acc[cols / 2];
        return c.to(dtype).to(Dev);
    }

    [Theory]
    [InlineData(ScalarType.BFloat16, 64L, "none", ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16, 37L, "same", ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16, 64L, "fp32", ScalarType.BFloat16)]
    [InlineData(ScalarType.BFloat16, 64L, "same", ScalarType.Float32)]
    [InlineData(ScalarType.Float16, 48L, "same", ScalarType.Float32)]
    [InlineData(ScalarType.Float32, 36L, "same", ScalarType.Float32)]
    [InlineData(ScalarType.Float32, 37L, "none", ScalarType.Float16)]
    public void Row_scale_forward_has_the_bits_of_mul_then_add(ScalarType dtype, long cols, string bias, ScalarType scaleType)
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(41);
        const long rows = 301; // no multiple of 8 rows × rows in flight: the guarded tail
        var inner = Activations(rows, cols, dtype, 3.0, gen, huge: true);
        var c = Scales(cols, scaleType, gen);
        Tensor? b = bias switch
        {
            "none" => null,
            "same" => randn([cols], generator: gen).to(dtype).to(Dev),
            _ => randn([cols], generator: gen).to(Dev),
        };
        var parts = new LowRankParts(null, b, null, null, 0);
        // What ScaleRows_ ran before the kernel: the in-place tensor ops.
        var expected = inner.clone();
        expected.mul_(c);
        if (b is not null) expected.add_(b);
        var before = LoraRowScaleKernels.ScaleLaunches;
        foreach (var shape in Shapes)
        {
            var y = inner.clone();
            With(shape, () =>
            {
                parts.ScaleRows_(y, c);
                return 0;
            });
            AssertSameBits(expected, y, $"c ⊙ x + b, rows in flight {shape.rows}, blocks/SM {shape.perSm}");
        }
        Assert.Null(LoraRowScaleKernels.CompileFailure);
        Assert.Equal(before + (TestDevice.IsCuda ? Shapes.Length : 0), LoraRowScaleKernels.ScaleLaunches);
    }

    [Fact]
    public void Row_scale_forward_leaves_what_it_does_not_take_to_the_tensor_ops()
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(43);
        var inner = Activations(16, 24, ScalarType.BFloat16, 1.0, gen);
        var c = Scales(24, ScalarType.Float32, gen);
        var before = LoraRowScaleKernels.ScaleLaunches;
        // A transposed view, an fp64 scale (the tensor ops then compute in fp64), a scale per row instead of per column.
        Assert.False(LoraRowScaleKernels.AppliesToScale(inner.t(), c, null));
        Assert.False(LoraRowScaleKernels.AppliesToScale(inner, c.to(ScalarType.Float64), null));
        Assert.False(LoraRowScaleKernels.AppliesToScale(inner, c, c.to(ScalarType.Float64)));
        Assert.False(LoraRowScaleKernels.AppliesToScale(inner, Scales(16, ScalarType.Float32, gen), null));
        Assert.Equal(TestDevice.IsCuda, LoraRowScaleKernels.AppliesToScale(inner, c, null));
        var parts = new LowRankParts(null, c.to(ScalarType.Float64), null, null, 0);
        var y = inner.clone();
        parts.ScaleRows_(y, c);
        var expected = inner.clone();
        expected.mul_(c).add_(c.to(ScalarType.Float64));
        AssertSameBits(expected, y, "fp64 bias through the tensor ops");
        Assert.Equal(before, LoraRowScaleKernels.ScaleLaunches);
        var enabled = LoraRowScaleKernels.Enabled;
        LoraRowScaleKernels.Enabled = false;
        try
        {
            Assert.False(LoraRowScaleKernels.AppliesToScale(inner, c, null));
        }
        finally
        {
            LoraRowScaleKernels.Enabled = enabled;
        }
    }

    [Theory]
    [InlineData(ScalarType.BFloat16, 64L, true, true)]
    [InlineData(ScalarType.BFloat16, 64L, true, false)]
    [InlineData(ScalarType.BFloat16, 37L, false, true)]
    [InlineData(ScalarType.Float16, 48L, true, true)]
    [InlineData(ScalarType.Float32, 36L, true, true)]
    [InlineData(ScalarType.Float32, 37L, false, true)]
    public void Scaled_swiglu_has_the_bits_of_the_swiglu_kernels_on_the_scaled_inputs(ScalarType dtype, long cols, bool gateScale, bool upScale)
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(47);
        const long rows = 301;
        var g = Activations(rows, cols, dtype, 2.0, gen);
        var u = Activations(rows, cols, dtype, 2.0, gen);
        var dh = Activations(rows, cols, dtype, 1.0, gen);
        Tensor? cg = gateScale ? Scales(cols, ScalarType.Float32, gen) : null, cu = upScale ? Scales(cols, ScalarType.Float32, gen) : null;
        if (!TestDevice.IsCuda)
        {
            Assert.False(LoraRowScaleKernels.Applies("silu", g, u));
            return;
        }
        Assert.True(LoraRowScaleKernels.Applies("silu", g, u));
        // The composite path: the in-place scaling of the tensor ops, then the SwiGLU kernels.
        Tensor Scaled(Tensor x, Tensor? c) => c is null ? x : x.clone().mul_(c);
        var (G, U) = (Scaled(g, cg), Scaled(u, cu));
        var h = empty_like(g);
        FusedKernels.SwiGluForward(G, U, h);
        var (dG, dU) = (empty_like(g), empty_like(u));
        FusedKernels.SwiGluBackward(dh, G, U, dG, dU);
        var (dg, du) = (Scaled(dG, cg), Scaled(dU, cu)); // as the composite backward: dg.mul_(c_gate), du.mul_(c_up)
        byte[]? dcgBits = null, dcuBits = null;
        var before = LoraRowScaleKernels.Launches;
        foreach (var shape in Shapes)
        {
            var what = $"rows in flight {shape.rows}, blocks/SM {shape.perSm}";
            var hk = With(shape, () => LoraRowScaleKernels.SwiGluForward(g, u, cg, cu));
            AssertSameBits(h, hk, $"h, {what}");
            var (dgk, duk, dcg, dcu) = With(shape, () => LoraRowScaleKernels.SwiGluBackward(dh, g, u, cg, cu));
            AssertSameBits(dg, dgk, $"dg, {what}");
            AssertSameBits(du, duk, $"du, {what}");
            // The backward that writes h too: the same gradients, and h with the forward's bits.
            var hb = empty_like(g);
            var (dgh, duh, dcgh, dcuh) = With(shape, () => LoraRowScaleKernels.SwiGluBackward(dh, g, u, cg, cu, hb));
            AssertSameBits(h, hb, $"h from the backward, {what}");
            AssertSameBits(dg, dgh, $"dg (with h), {what}");
            AssertSameBits(du, duh, $"du (with h), {what}");
            if (dcg is not null) Assert.True(Bits(dcg).AsSpan().SequenceEqual(Bits(dcgh!)), $"dc_gate (with h), {what}");
            if (dcu is not null) Assert.True(Bits(dcu).AsSpan().SequenceEqual(Bits(dcuh!)), $"dc_up (with h), {what}");
            Assert.Equal(gateScale, dcg is not null);
            Assert.Equal(upScale, dcu is not null);
            AssertSums(dcg, dG, g, $"dc_gate, {what}");
            AssertSums(dcu, dU, u, $"dc_up, {what}");
            // The scales' gradients have the same bits whatever the rows in flight (each thread sums its rows in order).
            if (dcg is not null) Assert.True((dcgBits ??= Bits(dcg)).AsSpan().SequenceEqual(Bits(dcg)), $"dc_gate bits, {what}");
            if (dcu is not null) Assert.True((dcuBits ??= Bits(dcu)).AsSpan().SequenceEqual(Bits(dcu)), $"dc_up bits, {what}");
        }
        Assert.Null(LoraRowScaleKernels.CompileFailure);
        Assert.Equal(before + 3 * Shapes.Length, LoraRowScaleKernels.Launches);
    }

    // dc = Σ_rows d ⊙ x (the unscaled x) against fp64: within fp32 summation error, 1e-4 of Σ |d ⊙ x|.
    private static void AssertSums(Tensor? dc, Tensor d, Tensor x, string what)
    {
        if (dc is null) return;
        using var scope = NewDisposeScope();
        Assert.Equal(ScalarType.Float32, dc.dtype);
        var terms = d.to(ScalarType.Float64) * x.to(ScalarType.Float64);
        var error = (dc.to(ScalarType.Float64) - terms.sum(dim: 0)).abs();
        var bound = terms.abs().sum(dim: 0) * 1e-4 + 1e-30;
        Assert.True((error <= bound).all().item<bool>(), $"{what}: off by up to {(error / bound).max().item<double>():g3} of the bound");
    }

    [Theory]
    [InlineData(ScalarType.BFloat16, 64L, false, true)]
    [InlineData(ScalarType.BFloat16, 64L, true, true)]
    [InlineData(ScalarType.BFloat16, 37L, false, false)]
    [InlineData(ScalarType.Float16, 48L, true, true)]
    [InlineData(ScalarType.Float32, 36L, false, true)]
    public void Row_scale_backward_matches_the_tensor_ops(ScalarType dtype, long cols, bool bias, bool scaleGrad)
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(53);
        const long rows = 301;
        var inner = Activations(rows, cols, dtype, 2.0, gen);
        var dy = Activations(rows, cols, dtype, 1.0, gen);
        var c = Scales(cols, ScalarType.Float32, gen);
        var b = bias ? randn([cols], generator: gen).to(dtype).to(Dev) : null;
        var y = inner.clone();
        new LowRankParts(null, b, null, null, 0).ScaleRows_(y, c);
        if (!TestDevice.IsCuda)
        {
            Assert.False(LoraRowScaleKernels.AppliesTo(dy));
            return;
        }
        Assert.True(LoraRowScaleKernels.AppliesTo(dy));
        var d = dy.clone().mul_(c); // the composite backward's d(inner)
        // dc = Σ_rows dy ⊙ (y − b) / c in fp64 (0 where c = 0), within fp32 summation error of Σ |dy ⊙ (y − b)| / |c|.
        var terms = dy.to(ScalarType.Float64) * (b is null ? y.to(ScalarType.Float64) : y.to(ScalarType.Float64) - b.to(ScalarType.Float64));
        var c64 = c.to(ScalarType.Float64);
        var expected = where(c64.eq(0), zeros_like(c64), terms.sum(dim: 0) / c64);
        var bound = where(c64.eq(0), zeros_like(c64), terms.abs().sum(dim: 0) * 1e-4 / c64.abs()) + 1e-30;
        byte[]? dcBits = null;
        var before = LoraRowScaleKernels.Launches;
        foreach (var shape in Shapes)
        {
            var what = $"rows in flight {shape.rows}";
            var (dk, dc) = With(shape, () => LoraRowScaleKernels.RowScaleBackward(dy, scaleGrad ? y : null, c, b));
            AssertSameBits(d, dk, $"d(inner), {what}");
            Assert.Equal(scaleGrad, dc is not null);
            if (dc is null) continue;
            Assert.Equal(ScalarType.Float32, dc.dtype);
            var error = (dc.to(ScalarType.Float64) - expected).abs();
            Assert.True((error <= bound).all().item<bool>(), $"dc, {what}: off by up to {(error / bound).max().item<double>():g3} of the bound");
            Assert.True((dcBits ??= Bits(dc)).AsSpan().SequenceEqual(Bits(dc)), $"dc bits, {what}");
        }
        Assert.Null(LoraRowScaleKernels.CompileFailure);
        Assert.Equal(before + Shapes.Length, LoraRowScaleKernels.Launches);
    }

    /// <summary>
    /// llama-1b's shapes (4 × 2048 tokens: SwiGLU over 8192 × 8192, q/down outputs 8192 × 2048, k/v 8192 × 512), where
    /// CUDA is there: every launch shape gives the composite's bits (the scales' gradients: the same bits for every one).
    /// gpu-rowscale.sh (beside this file) times these launches, and the composite ops beside them, under Nsight Compute.
    /// Returns at once elsewhere (too large for the CPU runs).
    /// </summary>
    [Fact]
    public void Llama_1b_shapes_have_the_composite_bits_for_every_launch_shape()
    {
        if (!TestDevice.IsCuda) return;
        using var scope = NewDisposeScope();
        torchx.manual_seed(59);
        const long tokens = 8192, inter = 8192;
        (int rows, int? perSm)[] shapes = [(1, null), (2, null), (4, null), (1, 8), (2, 8), (1, 32), (2, 32)];
        {
            using var mlp = NewDisposeScope();
            var (g, u, dh) = (randn([tokens, inter], ScalarType.BFloat16, Dev), randn([tokens, inter], ScalarType.BFloat16, Dev),
                randn([tokens, inter], ScalarType.BFloat16, Dev));
            var (cg, cu) = (rand([inter], device: Dev) + 0.5, rand([inter], device: Dev) + 0.5);
            var (G, U) = (g.clone().mul_(cg), u.clone().mul_(cu));
            var h = empty_like(g);
            FusedKernels.SwiGluForward(G, U, h);
            var (dg, du) = (empty_like(g), empty_like(u));
            FusedKernels.SwiGluBackward(dh, G, U, dg, du);
            dg.mul_(cg);
            du.mul_(cu);
            byte[]? dcgBits = null;
            foreach (var shape in shapes)
            {
                using var each = NewDisposeScope();
                AssertSameBits(h, With(shape, () => LoraRowScaleKernels.SwiGluForward(g, u, cg, cu)), $"h, {shape}");
                if (shape.perSm is not null) continue; // the backward's grid does not take it
                var (dgk, duk, dcg, _) = With(shape, () => LoraRowScaleKernels.SwiGluBackward(dh, g, u, cg, cu));
                AssertSameBits(dg, dgk, $"dg, {shape}");
                AssertSameBits(du, duk, $"du, {shape}");
                Assert.True((dcgBits ??= Bits(dcg!)).AsSpan().SequenceEqual(Bits(dcg!)), $"dc_gate bits, {shape}");
                var hb = empty_like(g);
                With(shape, () => LoraRowScaleKernels.SwiGluBackward(dh, g, u, cg, cu, hb));
                AssertSameBits(h, hb, $"h from the backward, {shape}");
            }
        }
        foreach (var cols in new[] { 2048L, 512L })
        {
            using var projection = NewDisposeScope();
            var (inner, dy) = (randn([tokens, cols], ScalarType.BFloat16, Dev), randn([tokens, cols], ScalarType.BFloat16, Dev));
            var c = rand([cols], device: Dev) + 0.5;
            var y = inner.clone().mul_(c);
            var d = dy.clone().mul_(c);
            byte[]? dcBits = null;
            foreach (var shape in shapes)
            {
                using var each = NewDisposeScope();
                var yk = inner.clone();
                With(shape, () =>
                {
                    LoraRowScaleKernels.ScaleRows_(yk, c, null);
                    return 0;
                });
                AssertSameBits(y, yk, $"c ⊙ x ({cols} columns), {shape}");
                if (shape.perSm is not null) continue;
                var (dk, dc) = With(shape, () => LoraRowScaleKernels.RowScaleBackward(dy, y, c, null));
                AssertSameBits(d, dk, $"d(inner) ({cols} columns), {shape}");
                Assert.True((dcBits ??= Bits(dc!)).AsSpan().SequenceEqual(Bits(dc!)), $"dc bits ({cols} columns), {shape}");
            }
        }
        Assert.Null(LoraRowScaleKernels.CompileFailure);
    }
}
