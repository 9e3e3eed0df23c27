using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.Plugins.DoRA;

/// <summary>Launchers of the fused DoRA output kernels (<see cref="DoraKernelSource"/>). Tensors are contiguous, on one CUDA device.</summary>
internal static class DoraKernels
{
    private static readonly CudaProgram program = new(DoraKernelSource.Name, DoraKernelSource.Code);

    private static readonly Dim3 Block = new(32, 8);

    /// <summary>Blocks down the rows: about 8 blocks of 256 threads per multiprocessor over all column tiles.</summary>
    public static int RowBlocks(Tensor on, long rows, long cols)
    {
        long sms = CudaKernels.MultiprocessorCount(DeviceIndex(on));
        var tiles = Math.Max(1, (cols + 255) / 256);
        var by = Math.Min((rows + 7) / 8, Math.Max(1, 8 * sms / tiles));
        return (int)Math.Clamp(by, 1, 65535);
    }

    /// <summary>y = t + c·(t − b) over (rows × cols); bias may be null.</summary>
    public static void Forward(Tensor t, Tensor c32, Tensor? bias, Tensor y, long rows, long cols, int rowBlocks)
    {
        if (rows == 0 || cols == 0) return;
        var v = VectorWidth(t.dtype);
        IntPtr pt = Ptr(t), py = Ptr(y);
        var vec = cols % v == 0 && Aligned16(pt) && Aligned16(py);
        var nvec = vec ? cols / v : cols;
        program.Function(DeviceIndex(t), $"lh_dora_fwd_{Suffix(t.dtype)}_{(vec ? "v" : "1")}")
            .Launch(new Dim3((uint)((nvec + 31) / 32), (uint)rowBlocks), Block, 0,
                new KernelArgs().Ptr(pt).Ptr(Ptr(c32)).Ptr(bias is null ? IntPtr.Zero : Ptr(bias)).Ptr(py).I64(rows).I64(nvec));
    }

    /// <summary>gt = g·(1 + c) and gc (cols fp32) = Σ_i g·(y − b) / (1 + c), through rowBlocks × cols fp32 partial sums.</summary>
    public static void Backward(Tensor g, Tensor y, Tensor c32, Tensor? bias, Tensor gt, Tensor partial, Tensor gc, long rows, long cols, int rowBlocks)
    {
        if (cols == 0) return;
        var v = VectorWidth(y.dtype);
        IntPtr pg = Ptr(g), py = Ptr(y), pgt = Ptr(gt), pc = Ptr(c32), pp = Ptr(partial);
        var vec = cols % v == 0 && Aligned16(pg) && Aligned16(py) && Aligned16(pgt);
        var nvec = vec ? cols / v : cols;
        // rows == 0 still runs: every block writes its (zero) partial sums, so the reduce never reads unwritten memory.
        program.Function(DeviceIndex(y), $"lh_dora_bwd_{Suffix(y.dtype)}_{(vec ? "v" : "1")}")
            .Launch(new Dim3((uint)((nvec + 31) / 32), (uint)rowBlocks), Block, 0,
                new KernelArgs().Ptr(pg).Ptr(py).Ptr(pc).Ptr(bias is null ? IntPtr.Zero : Ptr(bias)).Ptr(pgt).Ptr(pp).I64(rows).I64(nvec));
        program.Function(DeviceIndex(y), "lh_dora_grad_c_reduce")
            .Launch((int)((cols + 31) / 32), Block, 0, new KernelArgs().Ptr(pp).I32(rowBlocks).Ptr(pc).Ptr(Ptr(gc)).I64(cols));
    }
}
