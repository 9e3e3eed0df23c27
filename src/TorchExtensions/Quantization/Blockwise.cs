using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Quantization;

/// <summary>Blockwise codebook quantization primitives (sorted codebooks only; see <see cref="FourBit"/> for NF4/FP4).</summary>
public static class Blockwise
{
    /// <summary>
    /// Scales each block of <paramref name="blocksize"/> values (the last one zero-padded) by its absolute maximum and
    /// replaces every value by the index of the nearest value of the sorted codebook (16 or 256 values). 4-bit indices
    /// are packed two per byte, first value in the high nibble (bitsandbytes' order). Returns the packed / 8-bit indices
    /// (uint8) and absmax (fp32, one per block), on x's device.
    /// </summary>
    public static (Tensor q, Tensor absmax) Quantize(Tensor x, Tensor sortedCode, long blocksize, int bits)
    {
        if (bits is not (4 or 8)) throw new ArgumentException("bits must be 4 or 8", nameof(bits));
        if (blocksize <= 0 || blocksize % 2 != 0) throw new ArgumentException("blocksize must be a positive even number", nameof(blocksize));
        if (!x.is_floating_point()) throw new ArgumentException($"only floating-point tensors can be quantized, got {x.dtype}", nameof(x));
        if (sortedCode.numel() != 1L << bits) throw new ArgumentException("the codebook must have 2^bits values", nameof(sortedCode));
        var n = x.numel();
        if (n == 0) throw new ArgumentException("cannot quantize an empty tensor", nameof(x));
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var flat = x.detach().reshape(-1).to(ScalarType.Float32);
        var blocks = (n + blocksize - 1) / blocksize;
        if (blocks * blocksize != n) flat = torch.nn.functional.pad(flat, [0, blocks * blocksize - n]);
        var view = flat.view(blocks, blocksize);
        var absmax = view.abs().amax([1]);
        var scale = torch.where(absmax.gt(0), absmax, ones_like(absmax));
        var normed = view / scale.unsqueeze(1);
        var c = sortedCode.to(ScalarType.Float32, x.device);
        var size = c.numel();
        var midpoints = (c.narrow(0, 1, size - 1) + c.narrow(0, 0, size - 1)) / 2;
        var idx = torch.bucketize(normed, midpoints).to(ScalarType.Byte).view(-1);
        if (bits == 4)
        {
            var pairs = idx.view(-1, 2);
            idx = pairs.select(1, 0).bitwise_left_shift(ByteScalar(4, x.device)).bitwise_or(pairs.select(1, 1));
        }
        return (idx.MoveToOuterDisposeScope(), absmax.MoveToOuterDisposeScope());
    }

    /// <summary>The inverse: code[index] × absmax of its block in fp32, the first <paramref name="numel"/> values, cast to <paramref name="dtype"/>.</summary>
    public static Tensor Dequantize(Tensor q, Tensor absmax, Tensor sortedCode, long blocksize, int bits, long numel, ScalarType dtype)
    {
        if (bits is not (4 or 8)) throw new ArgumentException("bits must be 4 or 8", nameof(bits));
        if (q.dtype != ScalarType.Byte) throw new ArgumentException("quantized values must be uint8", nameof(q));
        if (blocksize <= 0 || absmax.numel() * blocksize != q.numel() * (bits == 4 ? 2 : 1))
            throw new ArgumentException("the quantized tensor does not match its absmax count and blocksize");
        if (numel < 0 || numel > absmax.numel() * blocksize) throw new ArgumentException("numel exceeds the quantized values", nameof(numel));
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var idx = bits == 4 ? Unpack(q) : q;
        var c = sortedCode.to(ScalarType.Float32, q.device);
        var values = c.index_select(0, idx.to(ScalarType.Int32)).view(absmax.numel(), blocksize) * absmax.to(ScalarType.Float32).unsqueeze(1);
        return values.view(-1).narrow(0, 0, numel).to(dtype).MoveToOuterDisposeScope();
    }

    /// <summary>The 4-bit indices of packed bytes, high nibble first (uint8, twice as many).</summary>
    internal static Tensor Unpack(Tensor packed)
    {
        using var scope = NewDisposeScope();
        var hi = packed.bitwise_right_shift(ByteScalar(4, packed.device));
        var lo = packed.bitwise_and(ByteScalar(15, packed.device));
        return stack([hi, lo], 1).view(-1).MoveToOuterDisposeScope();
    }

    private static Tensor ByteScalar(byte value, Device device) => full([], value, ScalarType.Byte, device);
}
