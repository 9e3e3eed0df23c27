namespace LoRAHub.TorchExtensions.Tests;

using FX = torchx.nn.functional;

/// <summary>
/// The cross-entropy kernel of the fused linear cross-entropy (<see cref="CrossEntropyKernels"/>): where CUDA is there
/// (LORAHUB_TEST_DEVICE=cuda) against the tensor ops (LORAHUB_CE_KERNEL=0's path) for the loss and both gradients in fp32,
/// fp16 and bf16, with ignored rows, vocabularies that are no multiple of the vector width, chunks that do not divide the
/// rows, and the kernel's own outputs (per-row loss, softmax − onehot in place, unaligned rows, labels out of range) against
/// values computed in fp64. On CPU: the switch and the device choose the tensor ops and the kernel never launches.
/// </summary>
[Collection(KernelTestsCollection.Name)] // toggles CrossEntropyKernels.Enabled and counts its launches (process-wide)
public class CrossEntropyKernelTests
{
    private static readonly Device Dev = TestDevice.Current;

    private static (Tensor loss, Tensor dh, Tensor? dw, long launches) Run(bool kernel, Tensor hidden, Tensor weight, Tensor labels, long chunk,
        bool weightGrad, double upstream)
    {
        var (enabled, before) = (CrossEntropyKernels.Enabled, CrossEntropyKernels.Launches);
        CrossEntropyKernels.Enabled = kernel;
        try
        {
            var h = hidden.detach().clone().requires_grad_();
            var w = weight.detach().clone().requires_grad_(weightGrad);
            var value = FX.chunked_cross_entropy(h, w, labels, chunk, recompute: false);
            (value * upstream).backward();
            return (value.detach(), h.grad!, weightGrad ? w.grad : null, CrossEntropyKernels.Launches - before);
        }
        finally
        {
            CrossEntropyKernels.Enabled = enabled;
        }
    }

    // max |a − b| / max |b| in fp64.
    private static double RelErr(Tensor a, Tensor b)
    {
        using var scope = NewDisposeScope();
        var (x, y) = (a.to(ScalarType.Float64), b.to(ScalarType.Float64));
        Assert.False(x.isnan().any().item<bool>(), "NaN in the result");
        return (x - y).abs().max().item<double>() / Math.Max(1e-30, y.abs().max().item<double>());
    }

    private static Tensor Labels(long rows, long vocab, int seed)
    {
        var rng = new Random(seed);
        var values = Enumerable.Range(0, (int)rows).Select(i => i % 5 == 1 ? -100L : rng.NextInt64(vocab)).ToArray();
        values[0] = vocab - 1; // the last column (an element-wise tail where the vocabulary is no multiple of 8)
        return tensor(values, device: Dev);
    }

    [Theory]
    [InlineData(ScalarType.Float32, 64L, 37L, 16L, true, 1.0)]
    [InlineData(ScalarType.Float32, 1001L, 29L, 7L, false, -0.75)]
    [InlineData(ScalarType.BFloat16, 1001L, 37L, 16L, true, 1.0)]
    [InlineData(ScalarType.BFloat16, 4096L, 20L, 8L, true, 0.5)]
    [InlineData(ScalarType.Float16, 333L, 21L, 10L, true, 2.0)]
    public void Kernel_matches_the_tensor_ops(ScalarType dtype, long vocab, long rows, long chunk, bool weightGrad, double upstream)
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(31);
        var weight = (randn([vocab, 24], ScalarType.Float32, Dev) * 0.7).to(dtype);
        var hidden = randn([rows, 24], ScalarType.Float32, Dev).to(dtype);
        var labels = Labels(rows, vocab, 5);
        var (lc, dhc, dwc, none) = Run(false, hidden, weight, labels, chunk, weightGrad, upstream);
        var (lk, dhk, dwk, launched) = Run(true, hidden, weight, labels, chunk, weightGrad, upstream);
        Assert.Equal(0, none);
        var chunks = (rows + chunk - 1) / chunk;
        Assert.Equal(TestDevice.IsCuda ? chunks : 0, launched);
        Assert.Null(CrossEntropyKernels.CompileFailure);
        Assert.Equal(lc.dtype, lk.dtype);
        Assert.Equal(dhc.dtype, dhk.dtype);
        // Same logits GEMM, loss in fp32 from the same values: equal to fp32 rounding.
        Assert.True(Math.Abs(lk.item<float>() - lc.item<float>()) <= 1e-5 * Math.Abs(lc.item<float>()), $"loss {lk.item<float>()} vs {lc.item<float>()}");
        // Gradients: the same fp32 softmax rounded to the dtype (a last-bit difference at most), then the same GEMMs.
        var tol = dtype == ScalarType.Float32 ? 1e-5 : 1e-2;
        Assert.True(RelErr(dhk, dhc) < tol, $"hidden gradient differs by {RelErr(dhk, dhc)}");
        Assert.Equal(0.0, dhk[1].abs().sum().to(ScalarType.Float64).item<double>()); // an ignored row
        if (weightGrad) Assert.True(RelErr(dwk!, dwc!) < tol, $"weight gradient differs by {RelErr(dwk!, dwc!)}");
    }

    [Fact]
    public void Kernel_matches_the_tensor_ops_with_llamas_vocabulary_and_without_grad()
    {
        if (!TestDevice.IsCuda) return; // 128,256 columns: a CUDA case (the CPU runs the same tensor ops twice above)
        using var scope = NewDisposeScope();
        torchx.manual_seed(32);
        const long vocab = 128_256;
        var weight = (randn([vocab, 32], ScalarType.Float32, Dev) * 0.5).bfloat16();
        var hidden = randn([12, 32], ScalarType.Float32, Dev).bfloat16();
        var labels = Labels(12, vocab, 6);
        var (lc, dhc, dwc, _) = Run(false, hidden, weight, labels, 5, true, 1.0);
        var (lk, dhk, dwk, launched) = Run(true, hidden, weight, labels, 5, true, 1.0);
        Assert.Equal(3, launched);
        Assert.True(Math.Abs(lk.item<float>() - lc.item<float>()) <= 1e-5 * Math.Abs(lc.item<float>()), $"loss {lk.item<float>()} vs {lc.item<float>()}");
        Assert.True(RelErr(dhk, dhc) < 1e-2, $"hidden gradient differs by {RelErr(dhk, dhc)}");
        Assert.True(RelErr(dwk!, dwc!) < 1e-2, $"weight gradient differs by {RelErr(dwk!, dwc!)}");

        // Loss only (no gradient wanted): the kernel's first pass alone.
        var before = CrossEntropyKernels.Launches;
        using (no_grad())
        {
            var loss = FX.chunked_cross_entropy(hidden, weight, labels, 5);
            Assert.True(Math.Abs(loss.item<float>() - lc.item<float>()) <= 1e-5 * Math.Abs(lc.item<float>()), $"no-grad loss {loss.item<float>()} vs {lc.item<float>()}");
        }
        Assert.Equal(before + 3, CrossEntropyKernels.Launches);
    }

    [Theory]
    [InlineData(ScalarType.BFloat16, 1000L, 0L)]
    [InlineData(ScalarType.BFloat16, 1003L, 1L)] // rows start at every alignment: head and tail element-wise
    [InlineData(ScalarType.Float16, 777L, 3L)]
    [InlineData(ScalarType.Float32, 513L, 1L)]
    [InlineData(ScalarType.Float32, 5L, 0L)]
    public void Kernel_writes_row_losses_and_softmax_minus_onehot_in_place(ScalarType dtype, long vocab, long offset)
    {
        if (!TestDevice.IsCuda) return; // the kernel itself: CUDA only
        using var scope = NewDisposeScope();
        torchx.manual_seed(33);
        const long rows = 6;
        // A view that starts `offset` elements into its storage: the first row is not 16-byte aligned when offset > 0.
        var storage = (randn([rows * vocab + offset], ScalarType.Float32, Dev) * 4).to(dtype);
        var logits = storage.narrow(0, offset, rows * vocab).view(rows, vocab);
        logits[2].narrow(0, 0, Math.Min(3, vocab)).fill_(double.NegativeInfinity); // masked columns stay finite
        var labels = tensor(new long[] { vocab - 1, -100, vocab - 2, vocab, 1, -1 }, device: Dev); // rows 3 and 5 out of range
        var x = logits.to(ScalarType.Float64);
        var logp = x.log_softmax(-1);
        var rowLoss = empty([rows], ScalarType.Float32, Dev);

        // Without a gradient the logits are left as they are.
        var copy = logits.clone();
        CrossEntropyKernels.Forward(logits, labels, -100, rowLoss, gradient: false);
        Assert.True(copy.eq(logits).all().item<bool>(), "the logits changed without a gradient");
        CheckLosses();

        rowLoss.fill_(-1);
        CrossEntropyKernels.Forward(logits, labels, -100, rowLoss, gradient: true);
        CheckLosses();
        var p = logp.exp();
        foreach (var r in new long[] { 0, 2, 4 }) p[r, labels[r].item<long>()] -= 1;
        p[1].zero_(); // ignored: zeros
        // Rows 3 and 5 (labels out of range): the plain softmax.
        var expected = p.to(ScalarType.Float32).to(dtype).to(ScalarType.Float64);
        var got = logits.to(ScalarType.Float64);
        // The fp32 softmax rounded to the dtype: at most a last-bit difference from the fp64 one rounded.
        // fp32: exp2f's 2 ulp and lse's rounding. The absolute term: fp16's subnormal spacing, fp32's near p − 1 ≈ 0.
        var ulp = dtype switch { ScalarType.Float32 => 1e-5, ScalarType.Float16 => 1e-3, _ => 8e-3 };
        var excess = (got - expected).abs() - (expected.abs() * ulp + (dtype == ScalarType.Float32 ? 5e-7 : 6.1e-8));
        Assert.True(excess.max().item<double>() <= 0, $"gradient off by {(got - expected).abs().max().item<double>()}");
        Assert.Equal(0.0, got[1].abs().sum().item<double>());
        Assert.True(storage.narrow(0, 0, offset).to(ScalarType.Float64).isfinite().all().item<bool>()); // nothing before the view written

        void CheckLosses()
        {
            var loss = rowLoss.to(ScalarType.Float64);
            foreach (var r in new long[] { 0, 2, 4 })
            {
                var want = -logp[r, labels[r].item<long>()].item<double>();
                Assert.True(Math.Abs(loss[r].item<double>() - want) <= 2e-6 * Math.Max(1, Math.Abs(want)), $"row {r}: loss {loss[r].item<double>()}, expected {want}");
            }
            Assert.Equal(0.0, loss[1].item<double>());
            Assert.True(double.IsNaN(loss[3].item<double>()) && double.IsNaN(loss[5].item<double>()), "a label out of range gives a NaN loss");
        }
    }

    [Theory]
    [InlineData(ScalarType.BFloat16, 4099L, 3L)]
    [InlineData(ScalarType.Float32, 1000L, 0L)]
    public void Walking_blocks_match_a_block_per_row(ScalarType dtype, long vocab, long offset)
    {
        if (!TestDevice.IsCuda) return; // a CUDA kernel's launch shape
        using var scope = NewDisposeScope();
        torchx.manual_seed(35);
        // More rows than multiprocessors (the walking blocks take several each), unaligned rows, ignored rows.
        var rows = 3L * LoRAHub.TorchExtensions.Cuda.CudaKernels.MultiprocessorCount(DeviceIndex()) + 5;
        var storage = (randn([rows * vocab + offset], ScalarType.Float32, Dev) * 3).to(dtype);
        var labels = Labels(rows, vocab, 9);
        var perRow = RowsOnce(walk: false, gradient: true);
        var walked = RowsOnce(walk: true, gradient: true);
        // 1,024 threads add a row's exponentials in another order than 256: the loss may differ in its last bits, and a
        // gradient by one rounding of its dtype.
        Assert.True(RelErr(walked.loss, perRow.loss) <= 1e-6, $"losses differ by {RelErr(walked.loss, perRow.loss)}");
        var ulp = dtype == ScalarType.Float32 ? 1e-6 : 8e-3;
        var (g, w) = (walked.logits.to(ScalarType.Float64), perRow.logits.to(ScalarType.Float64));
        Assert.True(((g - w).abs() - w.abs() * ulp - 1e-9).max().item<double>() <= 0, $"gradients differ by {(g - w).abs().max().item<double>()}");
        // And against log_softmax in fp64 (the composite path's math), as the kernel's own test holds a block per row.
        var logp = storage.narrow(0, offset, rows * vocab).view(rows, vocab).to(ScalarType.Float64).log_softmax(-1);
        var kept = labels.ge(0);
        var want = -logp.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1).where(kept, zeros_like(logp.select(1, 0)));
        var got = walked.loss.to(ScalarType.Float64);
        Assert.True(((got - want).abs() - want.abs().clamp_min(1) * 2e-6).max().item<double>() <= 0,
            $"walked losses off the fp64 log_softmax by {(got - want).abs().max().item<double>()}");
        var lossOnly = RowsOnce(walk: true, gradient: false);
        Assert.True(lossOnly.loss.eq(walked.loss).all().item<bool>(), "the losses without a gradient differ");
        Assert.True(lossOnly.logits.eq(storage.narrow(0, offset, rows * vocab).view(rows, vocab)).all().item<bool>());

        (Tensor logits, Tensor loss) RowsOnce(bool walk, bool gradient)
        {
            var enabled = CrossEntropyKernels.RowsInL2Enabled;
            CrossEntropyKernels.RowsInL2Enabled = walk;
            try
            {
                var logits = storage.clone().narrow(0, offset, rows * vocab).view(rows, vocab);
                var loss = empty([rows], ScalarType.Float32, Dev);
                CrossEntropyKernels.Forward(logits, labels, -100, loss, gradient);
                return (logits, loss);
            }
            finally
            {
                CrossEntropyKernels.RowsInL2Enabled = enabled;
            }
        }
    }

    private static int DeviceIndex() => Dev.index < 0 ? 0 : (int)Dev.index;

    [Fact]
    public void The_switch_the_device_and_fp64_choose_the_tensor_ops()
    {
        using var scope = NewDisposeScope();
        var enabled = CrossEntropyKernels.Enabled;
        Assert.Equal(Environment.GetEnvironmentVariable("LORAHUB_CE_KERNEL")?.Trim() != "0", enabled);
        var labels = tensor(new long[] { 1, 2 }, device: Dev);
        var h32 = randn([2, 4], device: Dev);
        var w32 = randn([3, 4], device: Dev);
        try
        {
            CrossEntropyKernels.Enabled = true;
            Assert.Equal(TestDevice.IsCuda, CrossEntropyKernels.Applies(h32, w32, labels));
            Assert.False(CrossEntropyKernels.Applies(h32.cpu(), w32.cpu(), labels.cpu()));
            Assert.False(CrossEntropyKernels.Applies(h32.to(ScalarType.Float64), w32.to(ScalarType.Float64), labels));
            CrossEntropyKernels.Enabled = false;
            Assert.False(CrossEntropyKernels.Applies(h32, w32, labels));
            // fp64 on this device: the tensor ops, no launch, and the exact mean of −log p.
            CrossEntropyKernels.Enabled = true;
            var before = CrossEntropyKernels.Launches;
            var (h, w) = (h32.to(ScalarType.Float64), w32.to(ScalarType.Float64));
            var loss = FX.chunked_cross_entropy(h, w, labels, 1).item<double>();
            var logp = h.mm(w.t()).log_softmax(-1);
            var want = -(logp[0, 1].item<double>() + logp[1, 2].item<double>()) / 2;
            Assert.True(Math.Abs(loss - want) < 1e-12, $"{loss} vs {want}");
            Assert.Equal(before, CrossEntropyKernels.Launches);
        }
        finally
        {
            CrossEntropyKernels.Enabled = enabled;
        }
    }
}
