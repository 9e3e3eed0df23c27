namespace LoRAHub.Torch.Quantization;

/// <summary>
/// A weight stored in 4 bits (QLoRA): two codes per byte, one absmax per block of 64 values, and optionally the
/// absmax values themselves quantized to 8 bits in blocks of 256 after subtracting their mean (double quantization).
/// </summary>
public sealed class FourBitTensor : IDisposable
{
    internal FourBitTensor(Tensor packed, Tensor? absmax, Tensor? absmaxCodes, Tensor? absmaxScales, double absmaxOffset,
        long[] shape, string quantType, int blocksize, Tensor code)
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
    }

    public Tensor Packed { get; }
    /// <summary>fp32 absmax per block, when not double-quantized.</summary>
    public Tensor? Absmax { get; }
    /// <summary>8-bit codes of (absmax − offset), when double-quantized.</summary>
    public Tensor? AbsmaxCodes { get; }
    /// <summary>fp32 scale per 256 absmax values, when double-quantized.</summary>
    public Tensor? AbsmaxScales { get; }
    public double AbsmaxOffset { get; }
    public long[] Shape { get; }
    public string QuantType { get; }
    public int Blocksize { get; }
    internal Tensor Code { get; }
    public bool DoubleQuantized => AbsmaxCodes != null;
    public long Numel => Shape.Aggregate(1L, (a, b) => a * b);

    /// <summary>Bytes held: packed codes plus the quantization constants.</summary>
    public long StorageBytes =>
        Packed.numel() + (Absmax?.numel() * 4 ?? 0) + (AbsmaxCodes?.numel() ?? 0) + (AbsmaxScales?.numel() * 4 ?? 0);

    /// <summary>The absmax constants (recovered from their 8-bit codes when double-quantized).</summary>
    public Tensor BlockAbsmax()
    {
        if (Absmax != null) return Absmax.alias();
        using var scope = torch.NewDisposeScope();
        using var dynamic = torch.tensor(QuantizationCodes.Dynamic8, device: Packed.device);
        var values = Blockwise.Dequantize(AbsmaxCodes!, AbsmaxScales!, dynamic, FourBit.AbsmaxBlocksize, 8,
            (Numel + Blocksize - 1) / Blocksize, ScalarType.Float32);
        return (values + AbsmaxOffset).MoveToOuterDisposeScope();
    }

    /// <summary>The weight in the compute dtype: code value × block absmax.</summary>
    public Tensor Dequantize(ScalarType dtype)
    {
        using var scope = torch.NewDisposeScope();
        var absmax = BlockAbsmax();
        return Blockwise.Dequantize(Packed, absmax, Code, Blocksize, 4, Numel, dtype).view(Shape).MoveToOuterDisposeScope();
    }

    public void Dispose()
    {
        Packed.Dispose();
        Absmax?.Dispose();
        AbsmaxCodes?.Dispose();
        AbsmaxScales?.Dispose();
        Code.Dispose();
    }
}

/// <summary>QLoRA's 4-bit quantization (NF4 or FP4) with optional double quantization.</summary>
public static class FourBit
{
    public const int AbsmaxBlocksize = 256;

    public static FourBitTensor Quantize(Tensor weight, string quantType = "nf4", int blocksize = 64, bool doubleQuant = true)
    {
        var values = quantType switch
        {
            "nf4" => QuantizationCodes.NF4,
            "fp4" => QuantizationCodes.FP4,
            _ => throw new ArgumentException($"unknown 4-bit type '{quantType}'; use nf4 or fp4"),
        };
        if (blocksize % 2 != 0) throw new ArgumentException("blocksize must be even (two 4-bit codes share a byte)");
        using var scope = torch.NewDisposeScope();
        // The kernels need a sorted codebook; FP4's bitsandbytes order is not, so codes are indices into the sorted one.
        var code = torch.tensor(values.OrderBy(v => v).ToArray(), device: weight.device);
        var (packed, absmax) = Blockwise.Quantize(weight, code, blocksize, 4);
        if (!doubleQuant)
            return new FourBitTensor(packed.DetachFromDisposeScope(), absmax.DetachFromDisposeScope(), null, null, 0, weight.shape, quantType, blocksize, code.DetachFromDisposeScope());
        var offset = absmax.mean().item<double>();
        using var dynamic = torch.tensor(QuantizationCodes.Dynamic8, device: weight.device);
        var (codes, scales) = Blockwise.Quantize(absmax - offset, dynamic, AbsmaxBlocksize, 8);
        return new FourBitTensor(packed.DetachFromDisposeScope(), null, codes.DetachFromDisposeScope(), scales.DetachFromDisposeScope(), offset,
            weight.shape, quantType, blocksize, code.DetachFromDisposeScope());
    }
}
