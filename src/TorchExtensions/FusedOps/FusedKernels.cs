using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>Launchers of Kernels/fused.cu (RMSNorm, SwiGLU, rotary embedding). Tensors are on one CUDA device.</summary>
internal static class FusedKernels
{
    /// <summary>Largest hidden size the RMSNorm backward takes: its per-block dw accumulator lives in 48 KB of shared memory.</summary>
    public const long RmsNormMaxCols = 12000;

    private static readonly CudaProgram program = CudaProgram.Embedded("fused.cu", dependentLaunch: true);

    private static CudaFunction Kernel(Tensor on, string op, bool vector) =>
        program.Function(DeviceIndex(on), $"lh_{op}_{Suffix(on.dtype)}_{(vector ? "v" : "1")}");

    // Threads per row for row kernels: the row's work rounded up to warps, 64..512.
    private static int ThreadsFor(long work) => (int)Math.Clamp((work + 31) / 32 * 32, 64, 512);

    // Enough blocks to fill any current GPU; the kernels' loops stride over the rest.
    private static int ElementwiseGrid(long work, int threads) => (int)Math.Clamp((work + threads - 1) / threads, 1, 132 * 32);

    /// <summary>
    /// y = w · cast(x · rstd) per row; rstd (rows fp32) is written for backward. x, w, y contiguous. A block per row
    /// (faster here than <see cref="RmsNormKernels"/>' row-per-warp forward, which runs with its ForwardRows): where rows
    /// are whole 16-byte packs RmsNormKernels' block kernel, which keeps the row in registers between its two passes
    /// (in a llama-1b step on an H200, 8192 × 2048 bf16: 32.5–33.5 µs where lh_rms_norm_fwd, reading the row twice, took
    /// 33.3–34: a microsecond), else lh_rms_norm_fwd. The same bits either way.
    /// </summary>
    public static void RmsNormForward(Tensor x, Tensor w, Tensor y, Tensor rstd, long rows, long cols, float eps)
    {
        if (rows == 0) return;
        if (RmsNormKernels.ForwardRows && RmsNormKernels.Applies(x, cols, x, w, y))
        {
            RmsNormKernels.Forward(x, null, w, y, null, rstd, rows, cols, eps);
            return;
        }
        if (RmsNormKernels.BlockApplies(x, cols, x, w, y))
        {
            RmsNormKernels.BlockForward(x, w, y, rstd, rows, cols, eps);
            return;
        }
        var v = VectorWidth(x.dtype);
        IntPtr px = Ptr(x), pw = Ptr(w), py = Ptr(y);
        var vec = cols % v == 0 && Aligned16(px) && Aligned16(py) && Aligned16(pw);
        Kernel(x, "rms_norm_fwd", vec).Launch((int)rows, ThreadsFor(vec ? cols / v : cols), 0,
            new KernelArgs().Ptr(px).Ptr(pw).Ptr(py).Ptr(Ptr(rstd)).I64(cols).F32(eps));
    }

    /// <summary>
    /// dx from dy for rows × cols contiguous tensors, plus <paramref name="dres"/> when given (the gradient h itself got
    /// besides the norm's, as in AddRmsNorm: dx = cast(dres + cast(norm's dx)), autograd's accumulation of the two);
    /// with <paramref name="dw"/> also the weight's gradient (per-block fp32 partials, then a column reduce).
    /// </summary>
    public static void RmsNormBackward(Tensor dy, Tensor x, Tensor w, Tensor rstd, Tensor? dres, Tensor dx, Tensor? dw, long rows, long cols)
    {
        if (rows == 0)
        {
            dw?.zero_();
            return;
        }
        // With dw, the row kernel's cols-float block accumulator takes the same shared memory as the older kernel's.
        if ((dw is null || cols <= RmsNormMaxCols) && RmsNormKernels.Applies(x, cols, dy, x, w, dres, dx))
        {
            var rowBlocks = RmsNormKernels.BackwardBlocks(x, rows, cols, dw is not null);
            var rowPartial = dw is null ? null : empty([rowBlocks, cols], ScalarType.Float32, x.device);
            RmsNormKernels.Backward(dy, x, w, rstd, dres, dx, rowPartial, rowBlocks, rows, cols);
            if (dw is not null) RmsNormWeightGradReduce(rowPartial!, rowBlocks, dw, cols);
            return;
        }
        int blocks;
        Tensor? partial = null;
        if (dw is not null)
        {
            // Per-block dw partials, then a column reduce: a few blocks per multiprocessor keep the loads in flight.
            var sms = CudaKernels.MultiprocessorCount(DeviceIndex(x));
            blocks = (int)Math.Max(1, Math.Min(rows, 4L * sms));
            partial = empty([blocks, cols], ScalarType.Float32, x.device);
        }
        else
        {
            blocks = (int)Math.Max(1, Math.Min(rows, 1L << 30));
        }
        var v = VectorWidth(x.dtype);
        IntPtr pdy = Ptr(dy), px = Ptr(x), pw = Ptr(w), pdx = Ptr(dx);
        var vec = cols % v == 0 && Aligned16(pdy) && Aligned16(px) && Aligned16(pdx) && Aligned16(pw);
        var shared = (int)((32 + (partial is null ? 0 : cols)) * sizeof(float));
        Kernel(x, "rms_norm_bwd", vec).Launch(blocks, ThreadsFor(vec ? cols / v : cols), shared,
            new KernelArgs().Ptr(pdy).Ptr(px).Ptr(pw).Ptr(Ptr(rstd)).Ptr(pdx).Ptr(partial is null ? IntPtr.Zero : Ptr(partial)).I64(rows).I64(cols));
        if (partial is not null) RmsNormWeightGradReduce(partial, blocks, dw!, cols);
        if (dres is not null) dx.add_(dres);
    }

    /// <summary>dw[c] = Σ_b partial[b, c], in dw's dtype.</summary>
    public static void RmsNormWeightGradReduce(Tensor partial, int blocks, Tensor dw, long cols)
    {
        if (cols == 0) return;
        program.Function(DeviceIndex(dw), $"lh_rms_norm_dw_reduce_{Suffix(dw.dtype)}")
            .Launch((int)((cols + 31) / 32), new Dim3(32, 8), 0, new KernelArgs().Ptr(Ptr(partial)).I32(blocks).Ptr(Ptr(dw)).I64(cols));
    }

    /// <summary>y = silu(g) · u over contiguous tensors of n elements.</summary>
    public static void SwiGluForward(Tensor g, Tensor u, Tensor y)
    {
        var n = g.numel();
        if (n == 0) return;
        var v = VectorWidth(g.dtype);
        IntPtr pg = Ptr(g), pu = Ptr(u), py = Ptr(y);
        var vec = n % v == 0 && Aligned16(pg) && Aligned16(pu) && Aligned16(py);
        var work = vec ? n / v : n;
        Kernel(g, "swiglu_fwd", vec).Launch(ElementwiseGrid(work, 256), 256, 0, new KernelArgs().Ptr(pg).Ptr(pu).Ptr(py).I64(work));
    }

    public static void SwiGluBackward(Tensor dy, Tensor g, Tensor u, Tensor dg, Tensor du)
    {
        var n = g.numel();
        if (n == 0) return;
        var v = VectorWidth(g.dtype);
        IntPtr pdy = Ptr(dy), pg = Ptr(g), pu = Ptr(u), pdg = Ptr(dg), pdu = Ptr(du);
        var vec = n % v == 0 && Aligned16(pdy) && Aligned16(pg) && Aligned16(pu) && Aligned16(pdg) && Aligned16(pdu);
        var work = vec ? n / v : n;
        Kernel(g, "swiglu_bwd", vec).Launch(ElementwiseGrid(work, 256), 256, 0,
            new KernelArgs().Ptr(pdy).Ptr(pg).Ptr(pu).Ptr(pdg).Ptr(pdu).I64(work));
    }

    /// <summary>
    /// Rotary embedding of x (B, H, T, D), unit stride along D, into y (same shape, unit stride along D), with fp32
    /// contiguous tables (T, D); <paramref name="backward"/> applies the transpose (x = dy, y = dx). Runs
    /// <see cref="RopeGqaKernels.Rope"/> (a block per group of tokens, cos/sin rows shared by their heads; the q/k/v variant
    /// of the same loop reaches 3.3-3.5 TB/s on an H200, where this kernel took 61 µs for llama-1b's q, ~1 TB/s) unless
    /// it is off or did not compile; then lh_rope of Kernels/fused.cu.
    /// </summary>
    public static void Rope(Tensor x, Tensor y, Tensor cos, Tensor sin, bool backward)
    {
        // The per-token kernel (cos/sin rows shared by a token's heads, bandwidth-bound); this one where it is off.
        if (RopeGqaKernels.Available(x) && x.size(0) * x.size(2) <= int.MaxValue && x.size(1) * x.size(3) <= int.MaxValue)
        {
            RopeGqaKernels.Rope(x, y, cos, sin, backward);
            return;
        }
        long b = x.size(0), h = x.size(1), t = x.size(2), d = x.size(3);
        var rows = b * h * t;
        if (rows == 0 || d == 0) return;
        var half = d / 2;
        var v = VectorWidth(x.dtype);
        var xs = x.stride();
        var ys = y.stride();
        IntPtr px = Ptr(x), py = Ptr(y);
        var vec = half % v == 0 && Aligned16(px) && Aligned16(py);
        for (var i = 0; i < 3; i++) vec = vec && xs[i] % v == 0 && ys[i] % v == 0;
        var hv = vec ? half / v : half;
        var total = rows * hv;
        Kernel(x, "rope", vec).Launch(ElementwiseGrid(total, 256), 256, 0, new KernelArgs()
            .Ptr(px).Ptr(py).Ptr(Ptr(cos)).Ptr(Ptr(sin))
            .I64(h).I64(t).I64(half).I64(hv).I64(xs[0]).I64(xs[1]).I64(xs[2]).I64(ys[0]).I64(ys[1]).I64(ys[2]).I64(cos.stride(0))
            .I64(total).I32(backward ? 1 : 0));
    }
}
