using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    public static partial class nn
    {
        public static partial class functional
        {
            /// <summary>
            /// RMS norm over the last dimension, in float32, then cast back and scaled (Llama's RMSNorm, transformers'
            /// rounding). On CUDA (fp32, fp16, bf16 with a weight of the input's dtype, hidden size ≤ 12000) one fused
            /// kernel each way; <paramref name="fused"/> overrides <see cref="Fused.RmsNorm"/> (false: the composite ops).
            /// </summary>
            public static Tensor rms_norm(Tensor input, Tensor? weight = null, double eps = 1e-6, bool? fused = null)
            {
                Require(input.dim() >= 1, "rms_norm expects an input with at least one dimension");
                if (weight is not null)
                {
                    Require(weight.dim() == 1 && weight.size(0) == input.size(-1),
                        $"rms_norm weight of shape {KernelTensors.Shape(weight)} does not match the input's last dimension (input {KernelTensors.Shape(input)})");
                    Require(KernelTensors.SameDevice(weight, input), "rms_norm input and weight are on different devices");
                }
                var cols = input.size(-1);
                if (weight is not null && (fused ?? Fused.RmsNorm) && KernelTensors.Usable(input) && weight.dtype == input.dtype &&
                    cols > 0 && cols <= FusedKernels.RmsNormMaxCols)
                {
                    try
                    {
                        return new RmsNormFunction(eps).apply(input, weight)[0];
                    }
                    catch (KernelCompileException)
                    {
                        // The kernels are off from now on (CudaKernels.UnavailableReason); this call takes the composite ops.
                    }
                }
                return RmsNormComposite(input, weight, eps);
            }

            /// <summary>The composite ops of <see cref="rms_norm"/>: normalise in fp32 (fp64 stays fp64), cast back, scale.</summary>
            internal static Tensor RmsNormComposite(Tensor x, Tensor? weight, double eps)
            {
                using var scope = NewDisposeScope();
                var h = x.dtype == ScalarType.Float64 ? x : x.to(ScalarType.Float32);
                var normed = (h * (h.pow(2).mean([-1], keepdim: true) + eps).rsqrt()).to(x.dtype);
                var y = weight is null ? normed : weight * normed;
                return y.MoveToOuterDisposeScope();
            }

            /// <summary>silu(gate) · up, Llama's SwiGLU; one fused kernel each way on CUDA (see <see cref="Fused.SwiGlu"/>).</summary>
            public static Tensor swiglu(Tensor gate, Tensor up, bool? fused = null)
            {
                Require(gate.shape.SequenceEqual(up.shape),
                    $"swiglu gate {KernelTensors.Shape(gate)} and up {KernelTensors.Shape(up)} differ in shape");
                Require(KernelTensors.SameDevice(gate, up), "swiglu gate and up are on different devices");
                Require(gate.dtype == up.dtype, $"swiglu gate ({gate.dtype}) and up ({up.dtype}) differ in dtype");
                if ((fused ?? Fused.SwiGlu) && KernelTensors.Usable(gate))
                {
                    try
                    {
                        return new SwiGluFunction().apply(gate, up)[0];
                    }
                    catch (KernelCompileException)
                    {
                        // The kernels are off from now on; this call takes the composite ops.
                    }
                }
                using var scope = NewDisposeScope();
                return (torch.nn.functional.silu(gate) * up).MoveToOuterDisposeScope();
            }

            /// <summary>
            /// Rotary position embedding, rotate_half convention: x·cos + rotate_half(x)·sin for x (batch, heads, seq,
            /// head_dim) and tables cos, sin (seq, head_dim). On CUDA with float32 tables one fused kernel each way, which
            /// keeps x's memory layout (see <see cref="Fused.Rope"/>); elsewhere the tables are cast to x's dtype first.
            /// </summary>
            public static Tensor rotary_embedding(Tensor x, Tensor cos, Tensor sin, bool? fused = null)
            {
                Require(x.dim() == 4, $"rotary embedding expects x of shape (batch, heads, seq, head_dim), got {KernelTensors.Shape(x)}");
                Require(x.size(3) % 2 == 0, $"rotary embedding needs an even head_dim, got {x.size(3)}");
                foreach (var t in new[] { cos, sin })
                    Require(t.dim() == 2 && t.size(0) == x.size(2) && t.size(1) == x.size(3),
                        $"rotary tables must be (seq, head_dim) = ({x.size(2)}, {x.size(3)}), got {KernelTensors.Shape(t)}");
                Require(KernelTensors.SameDevice(cos, x) && KernelTensors.SameDevice(sin, x), "rotary tables and x are on different devices");
                if ((fused ?? Fused.Rope) && KernelTensors.Usable(x) && cos.dtype == ScalarType.Float32 && sin.dtype == ScalarType.Float32)
                {
                    try
                    {
                        using var scope = NewDisposeScope();
                        var c = cos.contiguous();
                        var s = sin.contiguous();
                        return new RopeFunction().apply(x, c, s)[0].MoveToOuterDisposeScope();
                    }
                    catch (KernelCompileException)
                    {
                        // The kernels are off from now on; this call takes the composite ops.
                    }
                }
                return RopeComposite(x, cos, sin);
            }

            private static Tensor RopeComposite(Tensor x, Tensor cos, Tensor sin)
            {
                using var scope = NewDisposeScope();
                var half = x.size(-1) / 2;
                var rotated = torch.cat([x.narrow(-1, half, half).neg(), x.narrow(-1, 0, half)], -1);
                return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).MoveToOuterDisposeScope();
            }

            private static void Require(bool condition, string message)
            {
                if (!condition) throw new TorchException(TorchErrorKind.Argument, message);
            }
        }
    }
}
