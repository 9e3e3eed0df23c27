using LoRAHub.TorchExtensions;
using static TorchSharp.torch;

namespace LoRAHub.Tuners.Lora;

/// <summary>
/// PEFT's data-free inits beyond true/gaussian/false (LoraLayer.pissa_init, olora_init, orthogonal_init), applied to one
/// adapter of one layer after A and B exist. PiSSA and OLoRA move the top-r part of W into B·A and leave the residual
/// W − s·B·A in the base, so the layer computes the same output; done again on the original base when such an adapter
/// is loaded (as PEFT does), it recreates the residual the adapter was trained on.
/// </summary>
public static class LoraInitializers
{
    public static void Apply(LoraLinear layer, string adapter, LoraInit init)
    {
        if (init.IsPissa) Pissa(layer, adapter, init.PissaNiter);
        else if (init == LoraInit.Olora) Olora(layer, adapter);
        else if (init == LoraInit.Orthogonal) Orthogonal(layer, adapter);
    }

    /// <summary>A = diag(√(S/s))·Vhᵣ, B = Uᵣ·diag(√(S/s)) from the top-r SVD of W (randomized with <paramref name="niter"/>); W ← W − s·B·A.</summary>
    public static void Pissa(LoraLinear layer, string adapter, int? niter)
    {
        var w = Float32Weight(layer, "PiSSA");
        using var scope = NewDisposeScope();
        var r = layer.Rank(adapter);
        Tensor u, s, vh;
        if (niter is { } n) (u, s, vh) = SvdLowRank(w, r, n);
        else
        {
            var (uf, sf, vhf) = linalg.svd(w, fullMatrices: false);
            (u, s, vh) = (uf.narrow(1, 0, r), sf.narrow(0, 0, r), vhf.narrow(0, 0, r));
        }
        var root = s.div(layer.Scaling(adapter)).sqrt();
        SetAndResidualize(layer, adapter, w, a: root.unsqueeze(1).mul(vh), b: u.mul(root.unsqueeze(0)));
    }

    /// <summary>A = Rᵣ, B = Qᵣ from the QR decomposition of W; W ← W − s·B·A.</summary>
    public static void Olora(LoraLinear layer, string adapter)
    {
        var w = Float32Weight(layer, "OLoRA");
        using var scope = NewDisposeScope();
        var r = layer.Rank(adapter);
        var (q, rr) = linalg.qr(w);
        SetAndResidualize(layer, adapter, w, a: rr.narrow(0, 0, r), b: q.narrow(1, 0, r));
    }

    /// <summary>
    /// LoftQ on a dense base, as PEFT's LoraLayer.loftq_init: A and B from <see cref="Lora.LoftQ"/> (NF4, blocksize 64,
    /// no double quantization, as PEFT's bitsandbytes call), and the base weight becomes the dequantized 4-bit base.
    /// </summary>
    public static void LoftQ(LoraLinear layer, string adapter, int iterations)
    {
        var w = Float32Weight(layer, "LoftQ");
        using var scope = NewDisposeScope();
        var (_, dequantized, a, b) = Lora.LoftQ.Run(w, layer.Rank(adapter), layer.Scaling(adapter), iterations, Lora.LoftQ.FourBitRoundTrip());
        using var _ = no_grad();
        layer.A(adapter).copy_(a);
        layer.B(adapter).copy_(b);
        layer.SetBaseWeight(dequantized);
        layer.MarkAdapterWeightsChanged();
        w.Dispose();
    }

    /// <summary>A and B from the odd and even rows of a random orthogonal r×r basis (so B·A = 0), scaled by 1/10; r must be even.</summary>
    public static void Orthogonal(LoraLinear layer, string adapter)
    {
        var r = layer.Rank(adapter);
        if (r % 2 != 0)
            throw LoraOptions.Bad("init_lora_weights", $"\"orthogonal\" needs an even rank, got r = {r} for this layer (check r and rank_pattern)");
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        var linear = layer.base_linear;
        var q = linalg.qr(randn(r, r)).Q;
        var odd = q.index_select(0, arange(0, r, 2));
        var even = q.index_select(0, arange(1, r, 2));
        // PEFT draws on the CPU in fp32 and casts to the base weight's dtype.
        var a = randn(linear.in_features, r / 2).mm(odd).t().div(10.0).to(linear.weight_dtype);
        var b = randn(r / 2, linear.out_features).t().mm(even).div(10.0).to(linear.weight_dtype);
        layer.A(adapter).copy_(a);
        layer.B(adapter).copy_(b);
        layer.MarkAdapterWeightsChanged();
    }

    private static Tensor Float32Weight(LoraLinear layer, string init)
    {
        if (layer.IsQuantized)
            throw LoraOptions.Bad("init_lora_weights", $"\"{init.ToLowerInvariant()}\" decomposes the base weight, which is 4-bit here: initialize on the " +
                "full-precision model (then quantize the residual model) or use init_lora_weights true");
        if (layer.base_linear.weight_dtype is not (ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float64))
            throw LoraOptions.Bad("init_lora_weights", $"{init} needs a float base weight, got {layer.base_linear.weight_dtype}");
        using var _ = no_grad();
        return layer.base_linear.dense_weight().to(ScalarType.Float32, copy: true);
    }

    // A and B take the factors; the base becomes (W − s·B·A) rounded once to its dtype (PEFT's order of operations).
    private static void SetAndResidualize(LoraLinear layer, string adapter, Tensor w, Tensor a, Tensor b)
    {
        using var _ = no_grad();
        layer.A(adapter).copy_(a);
        layer.B(adapter).copy_(b);
        var residual = w.sub(b.matmul(a).mul(layer.Scaling(adapter)));
        layer.SetBaseWeight(residual);
        layer.MarkAdapterWeightsChanged();
        w.Dispose();
    }

    /// <summary>
    /// torch.svd_lowrank(A, q, niter) without oversampling, as PEFT calls it: a q-column basis of A's range from a random
    /// projection refined by <paramref name="niter"/> subspace iterations, then the SVD of A projected on it. (U, S, Vh).
    /// </summary>
    public static (Tensor u, Tensor s, Tensor vh) SvdLowRank(Tensor a, int q, int niter)
    {
        var transposed = a.size(0) < a.size(1);
        var m = transposed ? a.t() : a;
        var basis = linalg.qr(m.matmul(randn(m.size(1), q, dtype: m.dtype, device: m.device))).Q;
        for (var i = 0; i < niter; i++)
        {
            basis = linalg.qr(m.t().matmul(basis)).Q;
            basis = linalg.qr(m.matmul(basis)).Q;
        }
        var (u, s, vh) = linalg.svd(basis.t().matmul(m), fullMatrices: false);
        u = basis.matmul(u);
        // For the transposed problem Aᵀ = U S Vh, so A = Vhᵀ S Uᵀ.
        return transposed ? (vh.t(), s, u.t()) : (u, s, vh);
    }
}
