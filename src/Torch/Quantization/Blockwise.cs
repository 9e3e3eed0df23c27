namespace LoRAHub.Torch.Quantization;

/// <summary>Blockwise codebook quantization primitives (sorted codebooks only; see <see cref="FourBit"/> for NF4/FP4).</summary>
public static unsafe class Blockwise
{
    /// <summary>Indices of the nearest code value per element after scaling each block by its absmax.</summary>
    public static (Tensor q, Tensor absmax) Quantize(Tensor x, Tensor sortedCode, long blocksize, int bits)
    {
        IntPtr q, absmax;
        Native.Check(Native.lh_quantize_blockwise(x.Handle, sortedCode.Handle, blocksize, bits, &q, &absmax));
        return (new Tensor(q), new Tensor(absmax));
    }

    public static Tensor Dequantize(Tensor q, Tensor absmax, Tensor sortedCode, long blocksize, int bits, long numel, ScalarType dtype) =>
        new(Native.lh_dequantize_blockwise(q.Handle, absmax.Handle, sortedCode.Handle, blocksize, bits, numel, (int)dtype));
}
