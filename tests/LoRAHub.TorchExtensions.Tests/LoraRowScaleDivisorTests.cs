namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The row-scale backwards' divisors (<see cref="LoraRowScaleKernels.RowScaleBackward"/>'s divisor,
/// <see cref="LoraRowScaleKernels.SwiGluBackward"/>'s gate and up divisors): for c = m/n with n detached (DoRA's
/// c = m/‖V‖) the launch that sums the scale's gradient also divides it by n, giving m's gradient with the bits of the
/// undivided gradient then divided by autograd (DivBackward: grad / n), and everything else unchanged; and the row-scale
/// backward's column reduce inside its kernel (<see cref="LoraRowScaleKernels.FusedColumnReduce"/>) with the bits of the
/// separate lh_lora_col_reduce launch, on CUDA (LORAHUB_TEST_DEVICE=cuda). On the CPU the kernels do not apply and
/// nothing runs.
/// </summary>
[Collection(KernelTestsCollection.Name)] // counts the kernels' launches (process-wide)
public class LoraRowScaleDivisorTests
{
    private static readonly Device Dev = TestDevice.Current;

    private static void AssertSameBits(Tensor expected, Tensor actual, string what)
    {
        Assert.Equal(expected.dtype, actual.dtype);
        Assert.Equal(expected.shape, actual.shape);
        var same = expected.eq(actual).logical_or(expected.isnan().logical_and(actual.isnan())).all().item<bool>();
        Assert.True(same, $"{what}: bits differ (max |diff| {expected.to(ScalarType.Float64).sub(actual.to(ScalarType.Float64)).abs().max().ToDouble()})");
    }

    [Theory]
    [InlineData(300, 512, true)]     // k/v-like: vectors of 8 bf16 columns, a bias
    [InlineData(77, 37, false)]      // odd columns: one per lane
    public void Row_scale_gradient_divided_in_the_launch_is_autograds_division(int tokens, int cols, bool bias)
    {
        using var scope = NewDisposeScope();
        using var gen = new Generator(11);
        var dy = randn([tokens, cols], generator: gen).to(ScalarType.BFloat16).to(Dev);
        if (!LoraRowScaleKernels.AppliesTo(dy))
        {
            Assert.False(TestDevice.IsCuda, "the row-scale backward declined on CUDA");
            return;
        }
        var y = randn([tokens, cols], generator: gen).to(ScalarType.BFloat16).to(Dev);
        var c = (rand([cols], generator: gen) + 0.5).to(Dev);
        c[3].fill_(0);                                              // m = 0: no gradient recovered, 0 either way
        var n = (rand([cols], generator: gen) + 0.25).to(Dev);
        var b = bias ? randn([cols], generator: gen).to(ScalarType.BFloat16).to(Dev) : null;
        var launches = LoraRowScaleKernels.Launches;
        var (d0, dc) = LoraRowScaleKernels.RowScaleBackward(dy, y, c, b);
        var (d1, dm) = LoraRowScaleKernels.RowScaleBackward(dy, y, c, b, divisor: n);
        Assert.Equal(launches + 2, LoraRowScaleKernels.Launches);
        AssertSameBits(d0, d1, "d(inner)");
        AssertSameBits(dc!.div(n), dm!, "dm = dc / n");
        // Without y (c needs no gradient) the divisor changes nothing.
        var (d2, none) = LoraRowScaleKernels.RowScaleBackward(dy, null, c, b, divisor: n);
        Assert.Null(none);
        AssertSameBits(d0, d2, "d(inner) without y");
    }

    [Theory]
    [InlineData(300, 512, true, true)]      // k/v-like: 2 column tiles of 8-column vectors, many partial rows
    [InlineData(4096, 2048, false, false)]  // q/o-like
    [InlineData(77, 37, true, true)]        // odd columns: one per lane
    public void Fused_column_reduce_has_the_bits_of_the_separate_one(int tokens, int cols, bool bias, bool divided)
    {
        using var scope = NewDisposeScope();
        using var gen = new Generator(13);
        var dy = randn([tokens, cols], generator: gen).to(ScalarType.BFloat16).to(Dev);
        if (!LoraRowScaleKernels.AppliesTo(dy))
        {
            Assert.False(TestDevice.IsCuda, "the row-scale backward declined on CUDA");
            return;
        }
        var y = randn([tokens, cols], generator: gen).to(ScalarType.BFloat16).to(Dev);
        var c = (rand([cols], generator: gen) + 0.5).to(Dev);
        c[1].fill_(0);
        var n = divided ? (rand([cols], generator: gen) + 0.25).to(Dev) : null;
        var b = bias ? randn([cols], generator: gen).to(ScalarType.BFloat16).to(Dev) : null;
        var saved = LoraRowScaleKernels.FusedColumnReduce;
        try
        {
            LoraRowScaleKernels.FusedColumnReduce = false;
            var (d0, dc0) = LoraRowScaleKernels.RowScaleBackward(dy, y, c, b, n);
            LoraRowScaleKernels.FusedColumnReduce = true;
            var (d1, dc1) = LoraRowScaleKernels.RowScaleBackward(dy, y, c, b, n);
            var (_, dc2) = LoraRowScaleKernels.RowScaleBackward(dy, y, c, b, n);  // again: the tickets reset themselves
            AssertSameBits(d0, d1, "d(inner)");
            AssertSameBits(dc0!, dc1!, "dc, fused reduce vs lh_lora_col_reduce");
            AssertSameBits(dc1!, dc2!, "dc, a second fused launch");
        }
        finally
        {
            LoraRowScaleKernels.FusedColumnReduce = saved;
        }
    }

    [Theory]
    [InlineData(true, true)]
    [InlineData(true, false)]
    public void SwiGlu_scale_gradients_divided_in_the_launch_are_autograds_division(bool withH, bool upDivisor)
    {
        using var scope = NewDisposeScope();
        using var gen = new Generator(12);
        const int tokens = 130, inter = 256;
        var g = randn([tokens, inter], generator: gen).to(ScalarType.BFloat16).to(Dev);
        var u = randn([tokens, inter], generator: gen).to(ScalarType.BFloat16).to(Dev);
        if (!LoraRowScaleKernels.Applies("silu", g, u))
        {
            Assert.False(TestDevice.IsCuda && torchx.nn.functional.Fused.SwiGlu, "the scaled SwiGLU kernels declined on CUDA");
            return;
        }
        var dh = randn([tokens, inter], generator: gen).to(ScalarType.BFloat16).to(Dev);
        var cg = (rand([inter], generator: gen) + 0.5).to(Dev);
        var cu = (rand([inter], generator: gen) + 0.5).to(Dev);
        var ng = (rand([inter], generator: gen) + 0.25).to(Dev);
        var nu = (rand([inter], generator: gen) + 0.25).to(Dev);
        Tensor? H() => withH ? empty_like(g) : null;
        var (h0, h1) = (H(), H());
        var (dg0, du0, dcg, dcu) = LoraRowScaleKernels.SwiGluBackward(dh, g, u, cg, cu, h0);
        var (dg1, du1, dmg, dmu) = LoraRowScaleKernels.SwiGluBackward(dh, g, u, cg, cu, h1, gateDivisor: ng, upDivisor: upDivisor ? nu : null);
        AssertSameBits(dg0, dg1, "dg");
        AssertSameBits(du0, du1, "du");
        if (withH) AssertSameBits(h0!, h1!, "h");
        AssertSameBits(dcg!.div(ng), dmg!, "dm_gate = dc_gate / n_gate");
        AssertSameBits(upDivisor ? dcu!.div(nu) : dcu!, dmu!, upDivisor ? "dm_up = dc_up / n_up" : "dc_up (no divisor)");
    }
}
