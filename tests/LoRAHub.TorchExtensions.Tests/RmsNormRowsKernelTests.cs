using LoRAHub.TorchExtensions.Cuda;

namespace LoRAHub.TorchExtensions.Tests;

using FX = torchx.nn.functional;

/// <summary>
/// RMSNorm's row-in-registers kernels (FusedOps/RmsNormKernels.cs) and the fused residual add (add_rms_norm): against
/// the composite ops forward and backward (fp32, fp16, bf16; every packs-per-lane and warps-per-row shape, rows not a
/// multiple of the rows per block, with and without the weight's gradient), against fused.cu's block-per-row kernels,
/// and add_rms_norm's fallbacks. The composite path and the shared-gradient contract also run on the CPU.
/// </summary>
[Collection(KernelTestsCollection.Name)]
public class RmsNormRowsKernelTests
{
    // In the kernel collection: the tests switch the row kernels process-wide and count their launches.

    private static readonly Device Dev = TestDevice.Current;
    private static readonly Device Cuda = new(DeviceType.CUDA, 0);
    private static readonly ScalarType[] KernelTypes = [ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16];

    private static (double rtol, double atol) Tolerance(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => (1e-5, 1e-5),
        ScalarType.Float16 => (4e-3, 2e-3),
        _ => (2e-2, 1.6e-2),
    };

    private static bool RequireKernels()
    {
        if (!cuda.is_available()) return false;
        Assert.True(CudaKernels.Available, $"CUDA is available but LoRAHub's kernels are not: {CudaKernels.UnavailableReason}");
        Assert.True(RmsNormKernels.CompileFailure is null, RmsNormKernels.CompileFailure);
        return true;
    }

    // ---------------------------------------------------------------- every device

    [Fact]
    public void Add_rms_norm_composite_is_the_add_then_rms_norm()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(5);
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
        {
            var x0 = randn([3, 5, 64], ScalarType.Float32).to(dtype).to(Dev);
            var a0 = randn([3, 5, 64], ScalarType.Float32).to(dtype).to(Dev);
            var w0 = (randn([64], ScalarType.Float32) * 0.1 + 1).to(dtype).to(Dev);
            var du = randn([3, 5, 64], ScalarType.Float32).to(dtype).to(Dev);
            var dv = randn([3, 5, 64], ScalarType.Float32).to(dtype).to(Dev);
            var results = new List<Tensor[]>();
            foreach (var together in new[] { false, true })
            {
                var x = x0.clone().requires_grad_();
                var a = a0.clone().requires_grad_();
                var w = w0.clone().requires_grad_();
                Tensor h, y;
                if (together) (h, y) = FX.add_rms_norm(x, a, w, 1e-5, fused: false);
                else
                {
                    h = x + a;
                    y = FX.rms_norm(h, w, 1e-5, fused: false);
                }
                ((h * du).sum() + (y * dv).sum()).backward();
                results.Add([h, y, x.grad!, a.grad!, w.grad!]);
            }
            string[] names = ["h", "y", "dx", "da", "dw"];
            for (var i = 0; i < names.Length; i++) Assert.True(Exact.Equal(results[1][i], results[0][i]), $"{dtype} {names[i]}");
            // Without a residual the composite path hands back the input itself and rms_norm of it.
            var (same, normed) = FX.add_rms_norm(x0, null, w0, 1e-5, fused: false);
            Assert.Same(x0, same);
            Assert.True(Exact.Equal(normed, FX.rms_norm(x0, w0, 1e-5, fused: false)), $"{dtype} normed without residual");
        }
    }

    [Fact]
    public void Add_rms_norm_checks_its_arguments()
    {
        using var scope = NewDisposeScope();
        var x = randn([2, 8], ScalarType.Float32, Dev);
        Assert.ThrowsAny<Exception>(() => FX.add_rms_norm(x, x, ones([7], ScalarType.Float32, Dev)));
    }

    /// <summary>Hands the same gradient tensor to both of its inputs, as AddRmsNormFunction does (and autograd's add).</summary>
    private sealed class SharedGradient : CustomFunction
    {
        protected override string name => "shared_gradient_test";

        protected override Tensor[] forward(Tensor?[] inputs) => [inputs[0]! * 2 + inputs[1]! * 2];

        protected override Tensor?[] backward(Tensor[] grad_outputs)
        {
            var g = grad_outputs[0] * 2;
            return [g, g];
        }
    }

    [Fact]
    public void One_gradient_tensor_for_two_inputs_stays_two_gradients()
    {
        // Leaves: AccumulateGrad must not make x.grad and a.grad one tensor (an in-place change of one would change both).
        using var scope = NewDisposeScope();
        var x = ones([4, 3], ScalarType.Float32, Dev).requires_grad_();
        var a = ones([4, 3], ScalarType.Float32, Dev).requires_grad_();
        var u = arange(12, ScalarType.Float32, Dev).view(4, 3);
        (new SharedGradient().apply(x, a)[0] * u).sum().backward();
        Assert.True(Exact.Equal(x.grad!, u * 2));
        Assert.True(Exact.Equal(a.grad!, u * 2));
        using (no_grad()) x.grad!.add_(1);
        Assert.True(Exact.Equal(a.grad!, u * 2), "a's gradient changed with x's");

        // Non-leaves feeding one parameter, one of them also used elsewhere: the engine's accumulation stays exact.
        var p = ones([4, 3], ScalarType.Float32, Dev).requires_grad_();
        var xs = p * 3;
        var y = new SharedGradient().apply(xs, p * 5)[0];
        ((y * u).sum() + (xs * xs).sum()).backward();
        // d/dp: (2u)·3 + (2u)·5 + 2·xs·3 = 16u + 18
        Assert.True(Exact.Equal(p.grad!, u * 16 + 18));
    }

    /// <summary>Hands back a view of its input beside a result, as add_rms_norm without a residual does.</summary>
    private sealed class AliasAndDouble : CustomFunction
    {
        protected override string name => "alias_and_double_test";

        protected override Tensor[] forward(Tensor?[] inputs) => [inputs[0]!.alias(), inputs[0]! * 2];

        protected override Tensor?[] backward(Tensor[] grad_outputs) => [grad_outputs[0] + grad_outputs[1] * 2];
    }

    [Fact]
    public void A_view_of_the_input_as_an_output_takes_its_own_gradient()
    {
        using var scope = NewDisposeScope();
        var p = arange(6, ScalarType.Float32, Dev).view(2, 3).requires_grad_();
        var x = p * 3; // a non-leaf, as the residual stream is
        var outputs = new AliasAndDouble().apply(x);
        Assert.True(Exact.Equal(outputs[0], x));
        var u = tensor(new[] { 1f, 2, 3, 4, 5, 6 }, [2, 3], device: Dev);
        // The view flows on into a sum with another tensor (as the residual add), the result into a product.
        ((outputs[0] + outputs[1]) * u).sum().backward();
        // d/dx: u (through the view) + 2u (through 2x); d/dp = 3 · 3u.
        Assert.True(Exact.Equal(p.grad!, u * 9));
    }

    // ---------------------------------------------------------------- CUDA kernels against the composite ops

    // Whether the row kernels take rows of cols elements of dtype: whole 16-byte packs, at most 4 warps of 8 packs.
    private static bool RowsKernelTakes(ScalarType dtype, long cols)
    {
        var v = dtype == ScalarType.Float32 ? 4 : 8;
        return cols % v == 0 && cols / v <= 1024;
    }

    [Theory]
    [InlineData(9, 2048, true)]    // llama-1b's hidden size: one warp of 8 packs per lane (bf16)
    [InlineData(7, 4096, false)]   // two warps per row (bf16), four (fp32)
    [InlineData(4, 8192, true)]    // four warps per row (bf16); fp32 wider than the row kernels take: fused.cu's
    [InlineData(5, 12000, true)]   // the widest the API takes: fused.cu's kernels
    [InlineData(13, 64, true)]     // 2 packs per lane, most lanes idle
    [InlineData(6, 1000, false)]   // 125 packs (bf16): 4 per lane, partial
    [InlineData(3, 2056, true)]    // 257 packs (bf16): two warps; fp32 three
    public void Rows_kernel_rms_norm_matches_composite(int rows, int cols, bool weightGrad)
    {
        if (!RequireKernels()) return;
        foreach (var dtype in KernelTypes)
        {
            using var scope = NewDisposeScope();
            torchx.manual_seed(rows * 7 + cols);
            var x0 = (randn([rows, cols], ScalarType.Float32) * 2).to(dtype).to(Cuda);
            var w0 = (randn([cols], ScalarType.Float32) * 0.2 + 1).to(dtype).to(Cuda);
            var upstream = randn([rows, cols], ScalarType.Float32).to(dtype).to(Cuda);
            var results = new List<Tensor?[]>();
            var forwardRows = RmsNormKernels.ForwardRows;
            try
            {
                // The composite ops, then the default (fused.cu's forward, the row backward), then the row forward too.
                foreach (var (fused, rowsForward) in new[] { (false, false), (true, false), (true, true) })
                {
                    RmsNormKernels.ForwardRows = rowsForward;
                    var x = x0.clone().requires_grad_();
                    var w = w0.clone().requires_grad_(weightGrad);
                    var before = RmsNormKernels.Launches;
                    var y = FX.rms_norm(x, w, 1e-6, fused);
                    y.backward([upstream]);
                    // Forward: rows of whole packs take the row kernel (ForwardRows) or the block kernel; backward the row kernel.
                    var packs = cols % (dtype == ScalarType.Float32 ? 4 : 8) == 0 ? 1 : 0;
                    if (fused) Assert.Equal(before + packs + (RowsKernelTakes(dtype, cols) ? 1 : 0), RmsNormKernels.Launches);
                    results.Add([y, x.grad!, weightGrad ? w.grad! : null]);
                }
            }
            finally
            {
                RmsNormKernels.ForwardRows = forwardRows;
            }
            var (rtol, atol) = Tolerance(dtype);
            for (var f = 1; f < results.Count; f++)
            {
                FusedKernelTests.AssertClose(results[f][0]!, results[0][0]!, rtol, atol, $"{dtype} {cols} y ({f})");
                FusedKernelTests.AssertClose(results[f][1]!, results[0][1]!, rtol, atol, $"{dtype} {cols} dx ({f})");
                if (weightGrad) FusedKernelTests.AssertClose(results[f][2]!, results[0][2]!, rtol, atol, $"{dtype} {cols} dw ({f})");
            }
        }
    }

    [Theory]
    [InlineData(9, 2048)]   // a pack per thread: the row stays in registers
    [InlineData(3, 12000)]  // more packs than threads (bf16 1500, fp32 3000): the second pass reads the row again
    [InlineData(5, 64)]
    public void Plain_forward_through_the_block_kernel_has_fused_cus_bits(int rows, int cols)
    {
        // The same sum order and rounding as lh_rms_norm_fwd: y and rstd bit for bit, one launch of the block kernel.
        if (!RequireKernels()) return;
        foreach (var dtype in KernelTypes)
        {
            using var scope = NewDisposeScope();
            torchx.manual_seed(rows + 3 * cols);
            var x = (randn([rows, cols], ScalarType.Float32) * 2).to(dtype).to(Cuda);
            var w = (randn([cols], ScalarType.Float32) * 0.2 + 1).to(dtype).to(Cuda);
            var outputs = new List<Tensor>();
            var enabled = RmsNormKernels.Enabled;
            try
            {
                foreach (var block in new[] { false, true })
                {
                    RmsNormKernels.Enabled = block; // off: fused.cu's lh_rms_norm_fwd
                    var y = empty_like(x);
                    var rstd = empty([rows], ScalarType.Float32, x.device);
                    var before = RmsNormKernels.Launches;
                    FusedKernels.RmsNormForward(x, w, y, rstd, rows, cols, 1e-6f);
                    Assert.Equal(before + (block ? 1 : 0), RmsNormKernels.Launches);
                    outputs.Add(y);
                    outputs.Add(rstd);
                }
            }
            finally
            {
                RmsNormKernels.Enabled = enabled;
            }
            Assert.True(Exact.Equal(outputs[2], outputs[0]), $"{dtype} {cols} y");
            Assert.True(Exact.Equal(outputs[3], outputs[1]), $"{dtype} {cols} rstd");
        }
    }

    [Fact]
    public void Rows_kernel_matches_the_block_per_row_kernel()
    {
        // Only the order of the fp32 sums differs: y and dx agree to a rounding step of the dtype, dw to fp32 rounding.
        if (!RequireKernels()) return;
        foreach (var dtype in KernelTypes)
        {
            using var scope = NewDisposeScope();
            torchx.manual_seed(17);
            var x0 = randn([67, 2048], ScalarType.Float32).to(dtype).to(Cuda);
            var w0 = (randn([2048], ScalarType.Float32) * 0.2 + 1).to(dtype).to(Cuda);
            var upstream = randn([67, 2048], ScalarType.Float32).to(dtype).to(Cuda);
            var results = new List<Tensor[]>();
            var (enabled, forwardRows) = (RmsNormKernels.Enabled, RmsNormKernels.ForwardRows);
            try
            {
                foreach (var rowsKernel in new[] { false, true })
                {
                    (RmsNormKernels.Enabled, RmsNormKernels.ForwardRows) = (rowsKernel, rowsKernel);
                    var x = x0.clone().requires_grad_();
                    var w = w0.clone().requires_grad_();
                    var before = RmsNormKernels.Launches;
                    var y = FX.rms_norm(x, w, 1e-6, fused: true);
                    y.backward([upstream]);
                    Assert.Equal(before + (rowsKernel ? 2 : 0), RmsNormKernels.Launches);
                    results.Add([y, x.grad!, w.grad!]);
                }
            }
            finally
            {
                (RmsNormKernels.Enabled, RmsNormKernels.ForwardRows) = (enabled, forwardRows);
            }
            var (rtol, atol) = Tolerance(dtype);
            // y: a different rstd in its last fp32 bit can move a value across one rounding boundary of the dtype.
            FusedKernelTests.AssertClose(results[1][0], results[0][0], dtype == ScalarType.Float32 ? 1e-6 : rtol, 0, $"{dtype} y");
            FusedKernelTests.AssertClose(results[1][1], results[0][1], rtol, atol, $"{dtype} dx");
            var (dwr, dwa) = dtype == ScalarType.Float32 ? (1e-4, 1e-5) : (rtol, atol);
            FusedKernelTests.AssertClose(results[1][2], results[0][2], dwr, dwa, $"{dtype} dw");
            if (dtype == ScalarType.Float32) continue;
            // In fp16/bf16 nearly all outputs are the same bits.
            var same = results[1][0].eq(results[0][0]).to(ScalarType.Float32).mean().item<float>();
            Assert.True(same > 0.99, $"{dtype}: only {same:P2} of y is bit-identical to the block-per-row kernel's");
        }
    }

    [Theory]
    [InlineData(11, 2048, false, false)]
    [InlineData(5, 4096, true, false)]   // trainable weight: dw partials with the residual's gradient
    [InlineData(6, 100, true, false)]    // fp16/bf16 rows not whole 16-byte packs: the add as a tensor op, fused.cu's scalar kernels
    [InlineData(9, 2048, true, true)]    // row kernels switched off: the add as a tensor op, fused.cu's vector kernels
    [InlineData(3, 12000, true, false)]  // wider than the row backward takes (fp16/bf16: the block forward's loop)
    public void Add_rms_norm_matches_composite(int rows, int cols, bool weightGrad, bool rowsKernelOff)
    {
        if (!RequireKernels()) return;
        var enabled = RmsNormKernels.Enabled;
        try
        {
            RmsNormKernels.Enabled = !rowsKernelOff;
            foreach (var dtype in KernelTypes)
            {
                using var scope = NewDisposeScope();
                torchx.manual_seed(rows + cols);
                var x0 = (randn([rows, 2, cols], ScalarType.Float32) * 2).to(dtype).to(Cuda);
                var a0 = randn([rows, 2, cols], ScalarType.Float32).to(dtype).to(Cuda);
                var w0 = (randn([cols], ScalarType.Float32) * 0.2 + 1).to(dtype).to(Cuda);
                var dh = randn([rows, 2, cols], ScalarType.Float32).to(dtype).to(Cuda);
                var dy = randn([rows, 2, cols], ScalarType.Float32).to(dtype).to(Cuda);
                var results = new List<Tensor?[]>();
                foreach (var fused in new[] { false, true })
                {
                    var x = x0.clone().requires_grad_();
                    var a = a0.clone().requires_grad_();
                    var w = w0.clone().requires_grad_(weightGrad);
                    var before = FX.FusedAddRmsNormLaunches;
                    var (h, y) = FX.add_rms_norm(x, a, w, 1e-6, fused);
                    torch.autograd.backward([h, y], [dh, dy]);
                    // lh_rms_block_fwd_res where rows are whole packs, the row backward where it takes them.
                    var on = fused && !rowsKernelOff;
                    var forward = on && cols % (dtype == ScalarType.Float32 ? 4 : 8) == 0 ? 1 : 0;
                    var backward = on && RowsKernelTakes(dtype, cols) ? 1 : 0;
                    Assert.Equal(before + forward + backward, FX.FusedAddRmsNormLaunches);
                    results.Add([h, y, x.grad!, a.grad!, weightGrad ? w.grad! : null]);
                }
                // h is the rounded sum either way: the same bits.
                Assert.True(Exact.Equal(results[1][0]!, results[0][0]!), $"{dtype} h");
                var (rtol, atol) = Tolerance(dtype);
                FusedKernelTests.AssertClose(results[1][1]!, results[0][1]!, rtol, atol, $"{dtype} y");
                FusedKernelTests.AssertClose(results[1][2]!, results[0][2]!, rtol, atol, $"{dtype} dx");
                FusedKernelTests.AssertClose(results[1][3]!, results[0][3]!, rtol, atol, $"{dtype} da");
                Assert.True(Exact.Equal(results[1][2]!, results[1][3]!), $"{dtype}: dx and da differ");
                if (weightGrad) FusedKernelTests.AssertClose(results[1][4]!, results[0][4]!, rtol, atol, $"{dtype} dw");
            }
        }
        finally
        {
            RmsNormKernels.Enabled = enabled;
        }
    }

    [Theory]
    [InlineData(10, 2048, false)]
    [InlineData(4, 100, true)] // fp16/bf16: not whole packs, fused.cu's scalar kernels and an add_
    public void Add_rms_norm_without_residual_adds_the_inputs_two_gradients(int rows, int cols, bool weightGrad)
    {
        if (!RequireKernels()) return;
        foreach (var dtype in KernelTypes)
        {
            using var scope = NewDisposeScope();
            torchx.manual_seed(rows * cols);
            var x0 = (randn([rows, cols], ScalarType.Float32) * 2).to(dtype).to(Cuda);
            var w0 = (randn([cols], ScalarType.Float32) * 0.2 + 1).to(dtype).to(Cuda);
            var u = randn([rows, cols], ScalarType.Float32).to(dtype).to(Cuda);
            var dy = randn([rows, cols], ScalarType.Float32).to(dtype).to(Cuda);
            var results = new List<Tensor?[]>();
            foreach (var fused in new[] { false, true })
            {
                var x = x0.clone().requires_grad_();
                var w = w0.clone().requires_grad_(weightGrad);
                var before = FX.FusedAddRmsNormLaunches;
                var (s, y) = FX.add_rms_norm(x, null, w, 1e-6, fused);
                Assert.True(Exact.Equal(s, x0), "the sum without a residual is the input");
                // s flows on (here into a product), as the residual stream does: x gets that gradient and the norm's.
                torch.autograd.backward([s * u, y], [ones_like(u), dy]);
                var kernel = fused && RowsKernelTakes(dtype, cols);
                Assert.Equal(before + (kernel ? 1 : 0), FX.FusedAddRmsNormLaunches); // the backward, with the residual's gradient
                results.Add([y, x.grad!, weightGrad ? w.grad! : null]);
            }
            var (rtol, atol) = Tolerance(dtype);
            FusedKernelTests.AssertClose(results[1][0]!, results[0][0]!, rtol, atol, $"{dtype} y");
            FusedKernelTests.AssertClose(results[1][1]!, results[0][1]!, rtol, atol, $"{dtype} dx");
            if (weightGrad) FusedKernelTests.AssertClose(results[1][2]!, results[0][2]!, rtol, atol, $"{dtype} dw");
        }
    }

    [Fact]
    public void Add_rms_norm_with_only_the_norm_used_and_under_no_grad()
    {
        if (!RequireKernels()) return;
        using var scope = NewDisposeScope();
        torchx.manual_seed(3);
        var x0 = randn([8, 512], ScalarType.Float32).to(ScalarType.BFloat16).to(Cuda);
        var a0 = randn([8, 512], ScalarType.Float32).to(ScalarType.BFloat16).to(Cuda);
        var w = ones([512], ScalarType.BFloat16, Cuda);
        Tensor h, y;
        var before = FX.FusedAddRmsNormLaunches;
        using (no_grad()) (h, y) = FX.add_rms_norm(x0, a0, w, 1e-6, fused: true);
        Assert.Equal(before + 1, FX.FusedAddRmsNormLaunches);
        Assert.False(y.requires_grad);
        var (hc, yc) = FX.add_rms_norm(x0, a0, w, 1e-6, fused: false);
        Assert.True(Exact.Equal(h, hc));
        FusedKernelTests.AssertClose(y, yc, 2e-2, 1.6e-2, "no_grad y");
        // h's output unused: its gradient is zero, x and a get the norm's alone.
        var results = new List<Tensor[]>();
        foreach (var fused in new[] { false, true })
        {
            var x = x0.clone().requires_grad_();
            var a = a0.clone().requires_grad_();
            var (_, yy) = FX.add_rms_norm(x, a, w, 1e-6, fused);
            (yy.to(ScalarType.Float32) * arange(512, ScalarType.Float32, Cuda)).sum().backward();
            results.Add([x.grad!, a.grad!]);
        }
        FusedKernelTests.AssertClose(results[1][0], results[0][0], 2e-2, 1.6e-2, "dx");
        FusedKernelTests.AssertClose(results[1][1], results[0][1], 2e-2, 1.6e-2, "da");
    }

    [Fact]
    public void Llama_1b_shapes_agree_across_kernels()
    {
        // 8192 rows of 2048 bf16 (llama-1b, 4 × 2048 tokens), three times each: fused.cu's kernels, the default (its
        // forward, the row backward), the add then the norm, add_rms_norm; then the looping grid and the row forward
        // once. gpu-norms.sh times these launches with Nsight Compute.
        if (!RequireKernels()) return;
        using var scope = NewDisposeScope();
        torchx.manual_seed(19);
        const long rows = 8192, cols = 2048;
        var x0 = randn([rows, cols], ScalarType.Float32).to(ScalarType.BFloat16).to(Cuda);
        var a0 = randn([rows, cols], ScalarType.Float32).to(ScalarType.BFloat16).to(Cuda);
        var w = (randn([cols], ScalarType.Float32) * 0.2 + 1).to(ScalarType.BFloat16).to(Cuda);
        var dy = randn([rows, cols], ScalarType.Float32).to(ScalarType.BFloat16).to(Cuda);
        var dh = randn([rows, cols], ScalarType.Float32).to(ScalarType.BFloat16).to(Cuda);
        var (enabled, forwardRows, blocksPerSm, prefetch) =
            (RmsNormKernels.Enabled, RmsNormKernels.ForwardRows, RmsNormKernels.BlocksPerSm, RmsNormKernels.Prefetch);
        Tensor[] Norm()
        {
            var x = x0.clone().requires_grad_();
            var y = FX.rms_norm(x, w, 1e-5, fused: true);
            y.backward([dy]);
            return [y, x.grad!];
        }
        Tensor[] Add(bool together)
        {
            var x = x0.clone().requires_grad_();
            var a = a0.clone().requires_grad_();
            Tensor h, y;
            if (together) (h, y) = FX.add_rms_norm(x, a, w, 1e-5, fused: true);
            else
            {
                h = x + a;
                y = FX.rms_norm(h, w, 1e-5, fused: true);
            }
            torch.autograd.backward([h, y], [dh, dy]);
            return [h, y, x.grad!, a.grad!];
        }
        var norm = new List<Tensor[]>();
        var add = new List<Tensor[]>();
        try
        {
            foreach (var rowsKernel in new[] { false, true })
            {
                RmsNormKernels.Enabled = rowsKernel;
                Tensor[] last = [];
                for (var i = 0; i < 3; i++) last = Norm();
                norm.Add(last);
            }
            RmsNormKernels.Enabled = true;
            foreach (var together in new[] { false, true })
            {
                Tensor[] last = [];
                for (var i = 0; i < 3; i++) last = Add(together);
                add.Add(last);
            }
            // The looping backward grid (4 blocks per SM, prefetching): the same bits.
            (RmsNormKernels.BlocksPerSm, RmsNormKernels.Prefetch) = (4, true);
            var looped = Norm();
            var loopedAdd = Add(true);
            for (var i = 0; i < looped.Length; i++) Assert.True(Exact.Equal(looped[i], norm[1][i]), $"looping grid: norm output {i}");
            for (var i = 0; i < loopedAdd.Length; i++) Assert.True(Exact.Equal(loopedAdd[i], add[1][i]), $"looping grid: add output {i}");
            // The row forward (ForwardRows), plain and with the residual: its own sum order, so within rounding.
            (RmsNormKernels.BlocksPerSm, RmsNormKernels.ForwardRows) = (0, true);
            var rowsNorm = Norm();
            var rowsAdd = Add(true);
            FusedKernelTests.AssertClose(rowsNorm[0], norm[1][0], 2e-2, 0, "row forward y");
            FusedKernelTests.AssertClose(rowsNorm[1], norm[1][1], 2e-2, 1.6e-2, "row forward dx");
            Assert.True(Exact.Equal(rowsAdd[0], add[1][0]), "row forward h");
            FusedKernelTests.AssertClose(rowsAdd[1], add[1][1], 2e-2, 0, "row forward add y");
            FusedKernelTests.AssertClose(rowsAdd[2], add[1][2], 2e-2, 1.6e-2, "row forward add dx");
        }
        finally
        {
            (RmsNormKernels.Enabled, RmsNormKernels.ForwardRows, RmsNormKernels.BlocksPerSm, RmsNormKernels.Prefetch) =
                (enabled, forwardRows, blocksPerSm, prefetch);
        }
        FusedKernelTests.AssertClose(norm[1][0], norm[0][0], 2e-2, 0, "y");
        FusedKernelTests.AssertClose(norm[1][1], norm[0][1], 2e-2, 1.6e-2, "dx");
        Assert.True(Exact.Equal(add[1][0], add[0][0]), "h");
        // The same row kernels either way: y the same bits, dx the same bits as the engine's add of the two gradients.
        Assert.True(Exact.Equal(add[1][1], add[0][1]), "y");
        Assert.True(Exact.Equal(add[1][2], add[0][2]), "dx");
        Assert.True(Exact.Equal(add[1][3], add[0][3]), "da");
    }
}
