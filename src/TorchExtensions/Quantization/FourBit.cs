using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Quantization;

/// <summary>QLoRA's 4-bit quantization (NF4 or FP4) with optional double quantization.</summary>
public static class FourBit
{
    public const int AbsmaxBlocksize = 256;

    public static readonly IReadOnlyList<string> QuantTypes = ["nf4", "fp4"];

    /// <summary>True when the CUDA dequantization kernel can run here (LoRAHub's CUDA kernels are available).</summary>
    public static bool HasCudaKernel => CudaKernels.Available;

    /// <summary>The code values of a 4-bit type, by code index as bitsandbytes defines them.</summary>
    public static float[] CodeValues(string quantType) => quantType switch
    {
        "nf4" => QuantizationCodes.NF4,
        "fp4" => QuantizationCodes.FP4,
        _ => throw new ArgumentException($"unknown 4-bit type '{quantType}'; use nf4 or fp4"),
    };

    /// <summary>Quantizes on the weight's device; the result lives there too.</summary>
    public static FourBitTensor Quantize(Tensor weight, string quantType = "nf4", int blocksize = 64, bool doubleQuant = true)
    {
        var values = CodeValues(quantType);
        if (blocksize <= 0 || blocksize % 2 != 0)
            throw new ArgumentException($"blocksize must be a positive even number (two 4-bit codes share a byte), got {blocksize}");
        if (!weight.is_floating_point()) throw new ArgumentException($"only floating-point weights can be quantized, got {weight.dtype}");
        if (weight.numel() == 0) throw new ArgumentException("cannot quantize an empty weight");
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        // The kernels need a sorted codebook; FP4's bitsandbytes order is not, so codes are indices into the sorted one.
        var code = tensor(values.OrderBy(v => v).ToArray(), device: weight.device);
        var (packed, absmax) = Blockwise.Quantize(weight, code, blocksize, 4);
        if (!doubleQuant)
            return new FourBitTensor(packed.DetachFromDisposeScope(), absmax.DetachFromDisposeScope(), null, null, 0, weight.shape, quantType,
                blocksize, code.DetachFromDisposeScope(), null);
        // The mean of fp32 values is an fp32 value, so the offset is exactly representable in float32.
        var offset = (double)(float)absmax.mean().item<float>();
        var dynamic = tensor(QuantizationCodes.Dynamic8, device: weight.device);
        var (codes, scales) = Blockwise.Quantize(absmax - offset, dynamic, AbsmaxBlocksize, 8);
        return new FourBitTensor(packed.DetachFromDisposeScope(), null, codes.DetachFromDisposeScope(), scales.DetachFromDisposeScope(), offset,
            weight.shape, quantType, blocksize, code.DetachFromDisposeScope(), dynamic.DetachFromDisposeScope());
    }
}
