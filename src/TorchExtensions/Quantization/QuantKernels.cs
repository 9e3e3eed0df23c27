using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions.Quantization;

/// <summary>Launcher of Kernels/quant.cu: the 4-bit dequantization kernel.</summary>
internal static class QuantKernels
{
    private static readonly CudaProgram program = CudaProgram.Embedded("quant.cu", dependentLaunch: true);

    private static int Log2Exact(long v)
    {
        if (v <= 0 || (v & (v - 1)) != 0) return -1;
        var s = 0;
        while (1L << s < v) s++;
        return s;
    }

    // Grid-stride loops cover what 2^20 blocks of 256 threads do not.
    private static int GridFor(long work) => (int)Math.Clamp((work + 255) / 256, 1, 1 << 20);

    /// <summary>The flat weight (numel values) in <paramref name="dtype"/>, on the weight's CUDA device.</summary>
    public static Tensor Dequantize(FourBitTensor w, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var packed = w.Packed.contiguous();
        var code = w.Code.contiguous();
        var absmax = w.Absmax?.contiguous();
        var codes = w.AbsmaxCodes?.contiguous();
        var scales = w.AbsmaxScales?.contiguous();
        var nested = w.NestedCode?.contiguous();
        var numel = w.Numel;
        var outp = empty([numel], dtype, packed.device);
        IntPtr pp = Ptr(packed), po = Ptr(outp);
        var vec = ((long)pp & 3) == 0 && Aligned16(po) && numel % 8 == 0 && w.Blocksize % 8 == 0;
        var kernel = program.Function(DeviceIndex(packed), $"lh_dequant4_{(vec ? "vec8" : "scalar")}_{Suffix(dtype)}");
        var args = new KernelArgs().Ptr(pp).Ptr(Ptr(code)).I64(numel).I64(w.Blocksize)
            .Ptr(absmax is null ? IntPtr.Zero : Ptr(absmax))
            .Ptr(codes is null ? IntPtr.Zero : Ptr(codes))
            .Ptr(scales is null ? IntPtr.Zero : Ptr(scales))
            .Ptr(nested is null ? IntPtr.Zero : Ptr(nested))
            .F32((float)w.AbsmaxOffset)
            .I64(absmax is null ? FourBit.AbsmaxBlocksize : 0)
            .I32(Log2Exact(w.Blocksize))
            .I32(absmax is null ? Log2Exact(FourBit.AbsmaxBlocksize) : -1)
            .Ptr(po);
        kernel.Launch(GridFor(vec ? numel / 8 : (numel + 1) / 2), 256, 0, args);
        return outp.MoveToOuterDisposeScope();
    }
}
