using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using Fused = LoRAHub.TorchExtensions.torchx.nn.functional.Fused;

namespace LoRAHub.Plugins.DoRA;

/// <summary>
/// DoRA's two hot ops: the output y = t + (m/‖V‖ − 1)·(t − bias) (fused CUDA kernels where they apply, composite ops
/// elsewhere) and the row norms ‖W0 + s·B·A‖ from cached ‖W0_i‖², without weight-sized temporaries. Inputs are validated
/// identically on both paths; the composite ops are the reference the tests compare against.
/// </summary>
public static class DoraOps
{
    /// <summary>
    /// DoRA's output y = t + c·(t − bias) with the correction c = m/norm − 1 formed in <paramref name="magnitude"/>'s
    /// dtype (fp32 masters: fp32); t (…, out) is the base output plus the LoRA term; magnitude, norm, bias are (out).
    /// Autograd reaches t, the magnitude and the norm (detach it for DoRA's constant norm) and a trainable bias. On CUDA
    /// (t in fp32, fp16 or bf16 with at least one element, bias frozen) one kernel forward and one pass plus a column
    /// reduce backward, with c in fp32 registers, keeping y rather than t for backward (see <see cref="Fused.Dora"/>;
    /// <paramref name="fused"/> overrides it); elsewhere the composite ops t.addcmul(t, c) − bias·c with c cast to t's dtype.
    /// </summary>
    public static Tensor dora_output(Tensor t, Tensor magnitude, Tensor norm, Tensor? bias = null, bool? fused = null)
    {
        Require(t.dim() >= 1, "dora_output expects t with at least one dimension");
        var cols = t.size(-1);
        foreach (var v in new[] { magnitude, norm, bias })
        {
            if (v is null) continue;
            // The messages are built only on failure (this runs for every DoRA projection of every forward).
            if (v.dim() != 1 || v.size(0) != cols)
                Fail($"dora_output: vector of shape {KernelTensors.Shape(v)} does not match t's last dimension (t {KernelTensors.Shape(t)})");
            Require(KernelTensors.SameDevice(v, t), "dora_output: t and its vectors are on different devices");
        }
        using var scope = NewDisposeScope();
        var c = magnitude.div(norm).sub(1.0);
        var biasTrains = bias is not null && bias.requires_grad && is_grad_enabled();
        if ((fused ?? Fused.Dora) && KernelTensors.Usable(t) && t.numel() > 0 && c.is_floating_point() && !biasTrains)
        {
            try
            {
                return new DoraOutputFunction().apply(t, c, bias)[0].MoveToOuterDisposeScope();
            }
            catch (KernelCompileException)
            {
                // LoRAHub's kernels are off from now on (CudaKernels.UnavailableReason); this call takes the composite ops.
            }
        }
        var corr = c.dtype == t.dtype ? c : c.to(t.dtype);
        var y = t.addcmul(t, corr, 1);
        if (bias is not null) y = y.sub(bias.to(t.dtype).mul(corr));
        return y.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Row norms ‖W0 + s·B·A‖ (W0 out×in, A r×in, B out×r) from the cached squares ‖W0_i‖² (whose dtype, fp32 or fp64, the
    /// result has), without weight-sized temporaries: ‖W0_i‖² + Σ_k B_ik·(2s·W0·Aᵀ + s²·B·A·Aᵀ)_ik, clamped at 0 before the
    /// square root; W0·Aᵀ in W0's dtype. Differentiable in A and B under grad mode (the caller decides).
    /// </summary>
    public static Tensor dora_weight_norm(Tensor w0, Tensor base_norms_squared, Tensor a, Tensor b, double scaling)
    {
        Require(w0.dim() == 2 && a.dim() == 2 && b.dim() == 2 && base_norms_squared.dim() == 1,
            "dora_weight_norm expects W0 (out, in), A (r, in), B (out, r) and base norms (out)");
        if (a.size(1) != w0.size(1) || b.size(0) != w0.size(0) || b.size(1) != a.size(0) || base_norms_squared.size(0) != w0.size(0))
            Fail($"dora_weight_norm: shapes do not fit: W0 {KernelTensors.Shape(w0)}, A {KernelTensors.Shape(a)}, B {KernelTensors.Shape(b)}, " +
                 $"base norms {KernelTensors.Shape(base_norms_squared)}");
        return DoraWeightNorm.Factored(w0, base_norms_squared, a, b, scaling);
    }

    private static void Require(bool condition, string message)
    {
        if (!condition) Fail(message);
    }

    private static void Fail(string message) => throw new TorchException(TorchErrorKind.Argument, message);
}
