using LoRAHub.TorchExtensions.Quantization;
using static TorchSharp.torch;

namespace LoRAHub.Tuners.Lora;

/// <summary>
/// LoftQ (Li et al. 2023; PEFT's loftq_init): a quantized base Q and a rank-r adapter chosen together so that
/// Q + s·B·A approximates the full-precision W better than quantizing W alone. Alternating N times: Q = quant(W − L·R)
/// (the first time quant(W)), then L·R = the best rank-r approximation of W − Q (SVD). PEFT sets B·A = L·R whatever the
/// scaling s; here B = L/√s and A = R/√s, so the initial model is Q + L·R for any lora_alpha (the same factors when
/// lora_alpha = r). Q is the same as PEFT's either way, so a PEFT LoftQ adapter finds the base it was trained on.
/// </summary>
public static class LoftQ
{
    /// <summary>
    /// Runs LoftQ on <paramref name="weight"/> (out×in). <paramref name="quantizeDequantize"/> maps a fp32 tensor to its
    /// quantized-then-dequantized values. Returns, in fp32 on the weight's device: <c>quantize</c>, the tensor whose
    /// quantization is the base (quantize it with the same quantizer to get the 4-bit base exactly), <c>dequantized</c>,
    /// that base's values, and the adapter's A (r×in) and B (out×r).
    /// </summary>
    public static (Tensor quantize, Tensor dequantized, Tensor a, Tensor b) Run(Tensor weight, int rank, double scaling, int iterations,
        Func<Tensor, Tensor> quantizeDequantize)
    {
        if (iterations < 1) throw new ArgumentException($"loftq_iter must be at least 1, got {iterations}");
        if (weight.dim() != 2) throw new ArgumentException($"LoftQ needs a 2-D weight, got [{string.Join(", ", weight.shape)}]");
        if (rank <= 0 || rank > Math.Min(weight.size(0), weight.size(1)))
            throw new ArgumentException($"LoftQ rank {rank} must be in [1, {Math.Min(weight.size(0), weight.size(1))}] for a [{string.Join(", ", weight.shape)}] weight");
        if (!(scaling > 0)) throw new ArgumentException($"LoftQ needs a positive LoRA scaling (lora_alpha > 0), got {scaling}");
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var w = weight.detach().to(ScalarType.Float32).contiguous();
        var input = w;
        Tensor dequantized = w, l = w, r = w;
        for (var i = 0; i < iterations; i++)
        {
            dequantized = quantizeDequantize(input).to(ScalarType.Float32);
            (l, r) = LowRank(w - dequantized, rank);
            if (i + 1 == iterations) break;
            input = w - l.mm(r);
        }
        var root = 1 / Math.Sqrt(scaling);
        return (input.contiguous().MoveToOuterDisposeScope(), dequantized.MoveToOuterDisposeScope(), r.mul(root).MoveToOuterDisposeScope(),
            l.mul(root).MoveToOuterDisposeScope());
    }

    /// <summary>‖W − Q − s·B·A‖_F / ‖W‖_F: how well a quantized base and an adapter approximate W.</summary>
    public static double RelativeError(Tensor weight, Tensor dequantized, Tensor a, Tensor b, double scaling)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var w = weight.to(ScalarType.Float32);
        var approx = dequantized.to(ScalarType.Float32) + b.to(ScalarType.Float32).mm(a.to(ScalarType.Float32)).mul(scaling);
        return (w - approx).norm().item<float>() / w.norm().item<float>();
    }

    /// <summary>The quantize-dequantize map of our blockwise 4-bit quantizer (PEFT's LoftQ: nf4, blocksize 64, no double quantization).</summary>
    public static Func<Tensor, Tensor> FourBitRoundTrip(string quantType = "nf4", int blocksize = 64, bool doubleQuant = false) => x =>
    {
        using var q = FourBit.Quantize(x.contiguous(), quantType, blocksize, doubleQuant);
        return q.Dequantize(ScalarType.Float32);
    };

    // L (out×r) = U·√S, R (r×in) = √S·Vh over the top r singular values (PEFT's _low_rank_decomposition).
    private static (Tensor l, Tensor r) LowRank(Tensor m, int rank)
    {
        var (u, s, vh) = linalg.svd(m, fullMatrices: false);
        var root = s.narrow(0, 0, rank).sqrt();
        return (u.narrow(1, 0, rank).mul(root.unsqueeze(0)), root.unsqueeze(1).mul(vh.narrow(0, 0, rank)));
    }
}
