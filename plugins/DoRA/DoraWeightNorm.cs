using LoRAHub.TorchExtensions;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.DoRA;

/// <summary>
/// Row norms of V = W0 + s·B·A (W0: out×in, A: r×in, B: out×r), one per output feature, as PEFT's get_weight_norm
/// (torch.linalg.norm(W0 + s·B·A, dim=1)). Results are in the accumulation dtype: fp32, or fp64 for fp64 adapters.
/// </summary>
public static class DoraWeightNorm
{
    // Rows of W widened to fp32 at a time when caching ‖W0_i‖²: bounds that temporary at 64 MiB.
    private const long ChunkElements = 1L << 24;

    public static ScalarType AccumulationType(Tensor adapterWeight) =>
        adapterWeight.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;

    /// <summary>‖W_i‖² per row in <paramref name="dtype"/>, widening a bounded block of rows at a time.</summary>
    public static Tensor RowNormsSquared(Tensor w, ScalarType dtype)
    {
        // On CUDA one read of W, summing in fp32 registers (LoRAHub's kernel; null where it does not apply).
        if (dtype == ScalarType.Float32 && LoraWeightNorms.row_norms_squared(w) is { } fast) return fast;
        using var scope = NewDisposeScope();
        var rows = w.size(0);
        var step = Math.Max(1, ChunkElements / Math.Max(1, w.size(1)));
        var parts = new List<Tensor>();
        for (long start = 0; start < rows; start += step)
            // ‖·‖₂ then squared: one read of the widened rows (square().sum() would write and read an fp32 copy more).
            parts.Add(linalg.vector_norm(w.narrow(0, start, Math.Min(step, rows - start)).to(dtype), 2, [1], false).square());
        return (parts.Count == 1 ? parts[0] : cat(parts)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// ‖V_i‖² = ‖W0_i‖² + 2s·Σ_k (W0·Aᵀ)_ik·B_ik + s²·Σ_kl B_ik·(A·Aᵀ)_kl·B_il, with <paramref name="baseNormsSquared"/> =
    /// ‖W0_i‖² cached. The one product with W0 (out×in by in×r, a single pass over W0) runs in W0's dtype like the base
    /// layer's own matmul, accumulating in fp32 inside the GEMM; for a bf16 W0 only its out×r result is rounded to bf16
    /// (relative 2⁻⁹ on the cross term, well under the rounding of a bf16 layer output). The rest is in the
    /// accumulation dtype. Differentiable in A and B (the caller detaches, or not).
    /// </summary>
    public static Tensor Factored(Tensor w0, Tensor baseNormsSquared, Tensor a, Tensor b, double scaling)
    {
        using var scope = NewDisposeScope();
        var acc = baseNormsSquared.dtype;
        var aw = a.dtype == w0.dtype ? a : a.to(w0.dtype);
        var w0At = w0.matmul(aw.t());                                   // out×r
        if (w0At.dtype != acc) w0At = w0At.to(acc);
        var a32 = a.dtype == acc ? a : a.to(acc);
        var b32 = b.dtype == acc ? b : b.to(acc);
        // Both terms are row sums of B ⊙ (…): one out×r matrix 2s·W0·Aᵀ + s²·B·(A·Aᵀ), built by one addmm.
        var inner = torchx.addmm(w0At, b32, a32.matmul(a32.t()), beta: 2 * scaling, alpha: scaling * scaling);
        var squared = baseNormsSquared.add(inner.mul(b32).sum(dim: 1));
        // Rounding can push a (near-)zero row slightly negative; sqrt must not turn it into NaN.
        return squared.clamp_min(0).sqrt().MoveToOuterDisposeScope();
    }

    /// <summary>‖W0 + s·B·A‖ per row with V materialised in the accumulation dtype: one weight-sized temporary.</summary>
    public static Tensor Direct(Tensor w0, Tensor a, Tensor b, double scaling)
    {
        using var scope = NewDisposeScope();
        var acc = AccumulationType(a);
        var a32 = a.dtype == acc ? a : a.to(acc);
        var b32 = b.dtype == acc ? b : b.to(acc);
        var w = w0.dtype == acc ? w0 : w0.to(acc);
        // Out of place when autograd must see it; in place into the widened copy otherwise (never into W0 itself).
        var v = is_grad_enabled() && (a.requires_grad || b.requires_grad) || ReferenceEquals(w, w0)
            ? w.add(b32.matmul(a32), alpha: scaling)
            : torchx.addmm_(w, b32, a32, beta: 1.0, alpha: scaling);
        return v.norm(dim: 1).MoveToOuterDisposeScope();
    }
}
