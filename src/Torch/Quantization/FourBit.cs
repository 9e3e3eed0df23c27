namespace LoRAHub.Torch.Quantization;

/// <summary>Which implementation dequantizes a 4-bit weight.</summary>
public enum DequantizeImpl
{
    /// <summary>The CUDA kernel for CUDA weights when the shim has it, libtorch ops otherwise.</summary>
    Auto = 0,
    /// <summary>libtorch ops (index_select × absmax), on any device.</summary>
    Portable = 1,
    /// <summary>The CUDA kernel; an error where it does not apply.</summary>
    CudaKernel = 2,
}

/// <summary>
/// A weight stored in 4 bits (QLoRA): two codes per byte, one absmax per block of 64 values, and optionally the
/// absmax values themselves quantized to 8 bits in blocks of 256 after subtracting their mean (double quantization).
/// </summary>
public sealed class FourBitTensor : IDisposable
{
    internal FourBitTensor(Tensor packed, Tensor? absmax, Tensor? absmaxCodes, Tensor? absmaxScales, double absmaxOffset,
        long[] shape, string quantType, int blocksize, Tensor code, Tensor? nestedCode)
    {
        Packed = packed;
        Absmax = absmax;
        AbsmaxCodes = absmaxCodes;
        AbsmaxScales = absmaxScales;
        AbsmaxOffset = absmaxOffset;
        Shape = shape;
        QuantType = quantType;
        Blocksize = blocksize;
        Code = code;
        NestedCode = nestedCode;
    }

    /// <summary>uint8, two codes per byte (first value in the high nibble), padded to whole blocks.</summary>
    public Tensor Packed { get; }
    /// <summary>fp32 absmax per block, when not double-quantized.</summary>
    public Tensor? Absmax { get; }
    /// <summary>8-bit codes of (absmax − offset), when double-quantized.</summary>
    public Tensor? AbsmaxCodes { get; }
    /// <summary>fp32 scale per 256 absmax values, when double-quantized.</summary>
    public Tensor? AbsmaxScales { get; }
    /// <summary>The mean of the fp32 absmax values (a float32 value), subtracted before their 8-bit quantization.</summary>
    public double AbsmaxOffset { get; private set; }
    public long[] Shape { get; }
    public string QuantType { get; }
    public int Blocksize { get; }
    /// <summary>The 16 code values (sorted) the packed indices point into.</summary>
    public Tensor Code { get; }
    /// <summary>The 256-value 8-bit dynamic code of double quantization, or null.</summary>
    public Tensor? NestedCode { get; }
    public bool DoubleQuantized => AbsmaxCodes != null;
    public long Numel => Shape.Aggregate(1L, (a, b) => a * b);
    public Device device => Packed.device;

    /// <summary>Bytes held: packed codes plus the quantization constants.</summary>
    public long StorageBytes =>
        Packed.numel() + (Absmax?.numel() * 4 ?? 0) + (AbsmaxCodes?.numel() ?? 0) + (AbsmaxScales?.numel() * 4 ?? 0);

    /// <summary>Every tensor of the weight (for moving or registering as buffers).</summary>
    public IEnumerable<Tensor> Tensors =>
        new[] { Packed, Absmax, AbsmaxCodes, AbsmaxScales, Code, NestedCode }.Where(t => t != null).Cast<Tensor>();

    private static IntPtr H(Tensor? t) => t?.Handle ?? IntPtr.Zero;

    /// <summary>The absmax constants (recovered from their 8-bit codes when double-quantized).</summary>
    public Tensor BlockAbsmax() =>
        new(Native.lh_fourbit_block_absmax(Packed.Handle, Code.Handle, H(Absmax), H(AbsmaxCodes), H(AbsmaxScales), H(NestedCode),
            AbsmaxOffset, Blocksize, Numel));

    /// <summary>The weight in the compute dtype: code value × block absmax (the CUDA kernel on GPU where available).</summary>
    public Tensor Dequantize(ScalarType dtype) => Dequantize(dtype, DequantizeImpl.Auto);

    public Tensor Dequantize(ScalarType dtype, DequantizeImpl impl)
    {
        using var scope = torch.NewDisposeScope();
        var flat = new Tensor(Native.lh_dequantize_4bit(Packed.Handle, Code.Handle, H(Absmax), H(AbsmaxCodes), H(AbsmaxScales),
            H(NestedCode), AbsmaxOffset, Blocksize, Numel, (int)dtype, (int)impl));
        return flat.view(Shape).MoveToOuterDisposeScope();
    }

    /// <summary>x·Wᵀ for this weight as (out×in), differentiable in x only; x must already be in the compute dtype.</summary>
    internal Tensor Linear(Tensor x, long outFeatures, long inFeatures) =>
        new(Native.lh_linear_4bit(x.Handle, Packed.Handle, Code.Handle, H(Absmax), H(AbsmaxCodes), H(AbsmaxScales), H(NestedCode),
            AbsmaxOffset, Blocksize, outFeatures, inFeatures));

    /// <summary>Takes over another quantization of the same shape and settings in place (tensor identities are kept).</summary>
    internal void Assign(FourBitTensor other)
    {
        if (!other.Shape.SequenceEqual(Shape) || other.Blocksize != Blocksize || other.DoubleQuantized != DoubleQuantized || other.QuantType != QuantType)
            throw new ArgumentException("a 4-bit weight can only take over a quantization of the same shape and settings");
        using var _ = torch.no_grad();
        Packed.set_data(other.Packed);
        Absmax?.set_data(other.Absmax!);
        AbsmaxCodes?.set_data(other.AbsmaxCodes!);
        AbsmaxScales?.set_data(other.AbsmaxScales!);
        AbsmaxOffset = other.AbsmaxOffset;
    }

    public void Dispose()
    {
        foreach (var t in Tensors) t.Dispose();
    }
}

/// <summary>QLoRA's 4-bit quantization (NF4 or FP4) with optional double quantization.</summary>
public static class FourBit
{
    public const int AbsmaxBlocksize = 256;

    public static readonly IReadOnlyList<string> QuantTypes = ["nf4", "fp4"];

    /// <summary>True when the native shim carries the CUDA dequantization kernel (a CUDA build).</summary>
    public static bool HasCudaKernel => Native.lh_quant_has_cuda_kernels() != 0;

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
        if (!weight.dtype.IsFloatingPoint()) throw new ArgumentException($"only floating-point weights can be quantized, got {weight.dtype}");
        if (weight.numel() == 0) throw new ArgumentException("cannot quantize an empty weight");
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        // The kernels need a sorted codebook; FP4's bitsandbytes order is not, so codes are indices into the sorted one.
        var code = torch.tensor(values.OrderBy(v => v).ToArray(), device: weight.device);
        var (packed, absmax) = Blockwise.Quantize(weight, code, blocksize, 4);
        if (!doubleQuant)
            return new FourBitTensor(packed.DetachFromDisposeScope(), absmax.DetachFromDisposeScope(), null, null, 0, weight.shape, quantType,
                blocksize, code.DetachFromDisposeScope(), null);
        // The mean of fp32 values is an fp32 value, so the offset is exactly representable in float32.
        var offset = (double)(float)absmax.mean().item<double>();
        var dynamic = torch.tensor(QuantizationCodes.Dynamic8, device: weight.device);
        var (codes, scales) = Blockwise.Quantize(absmax - offset, dynamic, AbsmaxBlocksize, 8);
        return new FourBitTensor(packed.DetachFromDisposeScope(), null, codes.DetachFromDisposeScope(), scales.DetachFromDisposeScope(), offset,
            weight.shape, quantType, blocksize, code.DetachFromDisposeScope(), dynamic.DetachFromDisposeScope());
    }
}
