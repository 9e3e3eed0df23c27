using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// act(g)·u and its gradients for the fused LoRA MLP: SwiGLU (silu; the fused kernels on CUDA where
/// <see cref="torchx.nn.functional.swiglu"/> takes them) and GeGLU (tanh or erf gelu). Forward runs the ops the composite
/// MLP runs; backward is hand-derived, in fp32 (fp64 stays fp64) with act(g) rounded to the inputs' dtype as the
/// composite path keeps it.
/// </summary>
internal static class LoraGatedActivation
{
    public static bool Supports(string activation) => activation is "silu" or "gelu_pytorch_tanh" or "gelu_new" or "gelu";

    private static bool Kernel(string activation, Tensor g) =>
        activation == "silu" && torchx.nn.functional.Fused.SwiGlu && KernelTensors.Usable(g) && g.is_contiguous();

    /// <summary>act(g)·u for g, u of one shape (contiguous on CUDA for the kernel).</summary>
    public static Tensor Forward(string activation, Tensor g, Tensor u)
    {
        if (Kernel(activation, g) && u.is_contiguous())
        {
            try
            {
                var y = empty_like(g);
                FusedKernels.SwiGluForward(g, u, y);
                return y;
            }
            catch (KernelCompileException)
            {
                // The kernels are off from now on; the composite ops below.
            }
        }
        using var scope = NewDisposeScope();
        var act = activation switch
        {
            "silu" => nn.functional.silu(g),
            "gelu_pytorch_tanh" or "gelu_new" => nn.functional.gelu(g, TorchSharp.Modules.GELU.Approximate.tanh),
            "gelu" => nn.functional.gelu(g),
            _ => throw new NotSupportedException($"activation '{activation}' is not supported by the fused LoRA MLP (silu, gelu_pytorch_tanh, gelu, gelu_new)"),
        };
        return act.mul(u).MoveToOuterDisposeScope();
    }

    /// <summary>(dg, du) from dh = ∂L/∂(act(g)·u).</summary>
    public static (Tensor dg, Tensor du) Backward(string activation, Tensor dh, Tensor g, Tensor u)
    {
        if (Kernel(activation, g) && u.is_contiguous() && dh.dtype == g.dtype)
        {
            try
            {
                var dhc = dh.contiguous();
                var dg = empty_like(g);
                var du = empty_like(u);
                FusedKernels.SwiGluBackward(dhc, g, u, dg, du);
                return (dg, du);
            }
            catch (KernelCompileException)
            {
                // The composite ops below.
            }
        }
        using var scope = NewDisposeScope();
        var math = g.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        var gf = g.to(math);
        Tensor act, dact;
        switch (activation)
        {
            case "silu":
            {
                var sig = gf.sigmoid();
                act = gf * sig;
                dact = sig * (1 + gf * (1 - sig));
                break;
            }
            case "gelu_pytorch_tanh" or "gelu_new":
            {
                // 0.5·g·(1 + tanh(k·(g + c·g³))), k = √(2/π), c = 0.044715.
                const double k = 0.7978845608028654, c = 0.044715;
                var t = (k * (gf + c * gf.pow(3))).tanh();
                act = 0.5 * gf * (1 + t);
                dact = 0.5 * (1 + t) + 0.5 * gf * (1 - t * t) * k * (1 + 3 * c * gf * gf);
                break;
            }
            case "gelu":
            {
                // g·Φ(g): Φ(g) + g·φ(g).
                var cdf = 0.5 * (1 + (gf * (1 / Math.Sqrt(2))).erf());
                act = gf * cdf;
                dact = cdf + gf * (-0.5 * gf * gf).exp() * (1 / Math.Sqrt(2 * Math.PI));
                break;
            }
            default:
                throw new NotSupportedException($"activation '{activation}' is not supported by the fused LoRA MLP (silu, gelu_pytorch_tanh, gelu, gelu_new)");
        }
        var d = dh.to(math);
        // The composite path multiplies by act(g) as stored in the activations' dtype.
        var duOut = (d * act.to(g.dtype).to(math)).to(u.dtype);
        var dgOut = (d * u.to(math) * dact).to(g.dtype);
        return (dgOut.MoveToOuterDisposeScope(), duOut.MoveToOuterDisposeScope());
    }
}
