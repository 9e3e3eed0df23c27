using LoRAHub.TorchExtensions.Cuda;
using Xunit;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The large products through cuBLAS without a workspace: on CUDA the products and in-place accumulations of every
/// operand layout the fused blocks pass (x·Wᵀ through a transposed view, dy·W, column slices of a wider buffer) against
/// libtorch's mm and the fp64 product, bf16 and fp16; elsewhere, and for layouts cuBLAS cannot take, libtorch's mm
/// with its results and its errors.
/// </summary>
[Collection(KernelTestsCollection.Name)] // toggles Enabled and counts launches (process-wide)
public class WorkspaceFreeGemmTests
{
    public static TheoryData<int, int, int, bool, bool> Shapes => new()
    {
        // m, k, n, b transposed (a weight's view W.t()), bf16
        { 8192, 2048, 8192, true, true },   // llama-1b gate's forward
        { 8192, 8192, 2048, false, true },  // down's dx
        { 1000, 200, 300, true, true },
        { 64, 48, 40, false, false },
        { 333, 130, 77, true, false },
    };

    [Theory]
    [MemberData(nameof(Shapes))]
    public void Products_match_libtorch_and_the_fp64_product(int m, int k, int n, bool transposed, bool bf16)
    {
        if (!cuda.is_available()) return;
        using var scope = NewDisposeScope();
        var dev = new Device(DeviceType.CUDA, 0);
        var dt = bf16 ? ScalarType.BFloat16 : ScalarType.Float16;
        torchx.manual_seed(5);
        var a = randn([m, k], ScalarType.Float32, dev).to(dt);
        var b = transposed ? randn([n, k], ScalarType.Float32, dev).to(dt).t() : randn([k, n], ScalarType.Float32, dev).to(dt);
        var before = WorkspaceFreeGemm.Launches;
        var ours = WorkspaceFreeGemm.Mm(a, b);
        Assert.Equal(before + 1, WorkspaceFreeGemm.Launches);
        var theirs = a.mm(b);
        var exact = a.to(ScalarType.Float64).mm(b.to(ScalarType.Float64));
        double Off(Tensor t) => t.to(ScalarType.Float64).sub(exact).abs().max().item<double>();
        // One rounding of an fp32 sum to the output dtype: within a unit in the last place of libtorch's own error.
        var scale = exact.abs().max().item<double>();
        Assert.True(Off(ours) <= Off(theirs) + scale * (bf16 ? 8e-3 : 1e-3), $"{Off(ours)} vs libtorch's {Off(theirs)}");

        var c = randn([m, n], ScalarType.Float32, dev).to(dt);
        var expected = c.clone().addmm_(a, b);
        WorkspaceFreeGemm.Addmm_(c, a, b);
        Assert.Equal(before + 2, WorkspaceFreeGemm.Launches);
        Assert.True(c.to(ScalarType.Float64).sub(expected.to(ScalarType.Float64)).abs().max().item<double>() <= scale * (bf16 ? 8e-3 : 1e-3));
        // At llama's shapes cuBLAS runs the statically scheduled variant of libtorch's tile: the same sums, the same bits
        // (smaller shapes may take another kernel family with or without the workspace).
        if (m >= 8192) Assert.True(Exact.Equal(ours, theirs), $"{m}×{k}×{n}: bits differ from libtorch's mm");
    }

    [Fact]
    public void Accumulating_into_column_slices_of_a_wider_buffer_matches_addmm()
    {
        if (!cuda.is_available()) return;
        using var scope = NewDisposeScope();
        var dev = new Device(DeviceType.CUDA, 0);
        torchx.manual_seed(6);
        // dx += dy_k·W_k with dy_k a column block of the stacked q/k/v gradient (row stride 3072), W_k's rows.
        var dy = randn([512, 3072], ScalarType.Float32, dev).to(ScalarType.BFloat16);
        var w = randn([3072, 2048], ScalarType.Float32, dev).to(ScalarType.BFloat16);
        var (dyk, wk) = (dy.narrow(1, 2048, 512), w.narrow(0, 2048, 512));
        var dx = WorkspaceFreeGemm.Mm(dy.narrow(1, 0, 2048), w.narrow(0, 0, 2048));
        var expected = dy.narrow(1, 0, 2048).mm(w.narrow(0, 0, 2048));
        var before = WorkspaceFreeGemm.Launches;
        WorkspaceFreeGemm.Addmm_(dx, dyk, wk);
        expected.addmm_(dyk, wk);
        Assert.Equal(before + 1, WorkspaceFreeGemm.Launches);
        var off = dx.to(ScalarType.Float32).sub(expected.to(ScalarType.Float32)).abs().max().item<float>();
        Assert.True(off <= 0.02f * expected.to(ScalarType.Float32).abs().max().item<float>(), $"{off}");
    }

    [Fact]
    public void Other_layouts_devices_and_dtypes_take_libtorch_with_its_results_and_errors()
    {
        using var scope = NewDisposeScope();
        var dev = cuda.is_available() ? new Device(DeviceType.CUDA, 0) : new Device(DeviceType.CPU);
        torchx.manual_seed(7);
        var wide = randn([64, 96], ScalarType.Float32, dev).to(ScalarType.BFloat16);
        var strided = wide.narrow(1, 0, 96).slice(1, 0, 96, 2);   // no unit stride in either dimension
        var b = randn([48, 32], ScalarType.Float32, dev).to(ScalarType.BFloat16);
        var f32 = randn([64, 48], ScalarType.Float32, dev);
        var before = WorkspaceFreeGemm.Launches;
        Assert.True(Exact.Equal(strided.mm(b), WorkspaceFreeGemm.Mm(strided, b)));
        Assert.True(Exact.Equal(f32.mm(b.to(ScalarType.Float32)), WorkspaceFreeGemm.Mm(f32, b.to(ScalarType.Float32))));
        Assert.Equal(before, WorkspaceFreeGemm.Launches);
        // A shape mismatch is libtorch's error, a .NET exception naming the shapes, not a crash.
        var e = Assert.ThrowsAny<Exception>(() => WorkspaceFreeGemm.Mm(b, b));
        Assert.Contains("48", e.Message);
        Assert.Equal(before, WorkspaceFreeGemm.Launches);
    }

    [Fact]
    public void Switched_off_it_runs_libtorch()
    {
        if (!cuda.is_available()) return;
        using var scope = NewDisposeScope();
        var dev = new Device(DeviceType.CUDA, 0);
        var a = randn([256, 128], ScalarType.Float32, dev).to(ScalarType.BFloat16);
        var b = randn([128, 64], ScalarType.Float32, dev).to(ScalarType.BFloat16);
        var before = WorkspaceFreeGemm.Launches;
        WorkspaceFreeGemm.Enabled = false;
        try
        {
            Assert.True(Exact.Equal(a.mm(b), WorkspaceFreeGemm.Mm(a, b)));
            Assert.Equal(before, WorkspaceFreeGemm.Launches);
        }
        finally
        {
            WorkspaceFreeGemm.Enabled = true;
        }
    }
}
