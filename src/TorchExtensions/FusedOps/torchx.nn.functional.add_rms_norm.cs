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
            /// Whether <see cref="add_rms_norm"/> runs as one fused function (default on; LORAHUB_ADD_RMSNORM=0: off, the
            /// add is a tensor op and the norm <see cref="rms_norm"/>). Settable at run time; it also needs
            /// <see cref="Fused.RmsNorm"/>.
            /// </summary>
            public static bool FusedAddRmsNorm { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_ADD_RMSNORM")?.Trim() != "0";

            /// <summary>Launches of the row kernels with a residual so far (add_rms_norm's forward and backward), for tests.</summary>
            public static long FusedAddRmsNormLaunches => RmsNormKernels.ResidualLaunches;

            /// <summary>
            /// A residual add followed by RMSNorm, as in a pre-norm decoder: sum = input + residual, normed =
            /// <see cref="rms_norm"/>(sum, weight, eps). Returns both (the sum carries the residual stream on). On CUDA (same
            /// shape, dtype and device for input and residual, a weight of their dtype, hidden size ≤ 12000) one kernel
            /// each way that reads input and residual once and writes sum and normed; backward gives input and residual
            /// sum's gradient plus the norm's in one pass. Same values as the two ops (the sum is rounded to the dtype
            /// before the norm, and the two gradients are added as autograd adds them). Without a residual (null) sum is
            /// the input (a view of it when fused): for a norm whose input also flows on, so that the input's two
            /// gradients are added in the norm's backward kernel. <paramref name="fused"/> overrides
            /// <see cref="FusedAddRmsNorm"/> and <see cref="Fused.RmsNorm"/> (false: the two ops, composite norm).
            /// </summary>
            public static (Tensor sum, Tensor normed) add_rms_norm(Tensor input, Tensor? residual, Tensor weight, double eps = 1e-6, bool? fused = null)
            {
                Require(input.dim() >= 1, "add_rms_norm expects an input with at least one dimension");
                Require(weight.dim() == 1 && weight.size(0) == input.size(-1),
                    $"add_rms_norm weight of shape {KernelTensors.Shape(weight)} does not match the input's last dimension (input {KernelTensors.Shape(input)})");
                Require(residual is null || input.shape.SequenceEqual(residual.shape),
                    $"add_rms_norm input {KernelTensors.Shape(input)} and residual {(residual is null ? "" : KernelTensors.Shape(residual))} differ in shape");
                var cols = input.size(-1);
                if ((fused ?? (FusedAddRmsNorm && Fused.RmsNorm)) && KernelTensors.Usable(input) &&
                    (residual is null || (residual.dtype == input.dtype && KernelTensors.SameDevice(residual, input))) &&
                    weight.dtype == input.dtype && KernelTensors.SameDevice(weight, input) && cols > 0 && cols <= FusedKernels.RmsNormMaxCols)
                {
                    try
                    {
                        var outputs = new AddRmsNormFunction(eps).apply(input, residual, weight);
                        return (outputs[0], outputs[1]);
                    }
                    catch (KernelCompileException)
                    {
                        // The kernels are off from now on (CudaKernels.UnavailableReason); this call takes the two ops.
                    }
                }
                if (residual is null) return (input, rms_norm(input, weight, eps, fused == false ? false : null));
                using var scope = NewDisposeScope();
                var sum = input + residual;
                var normed = rms_norm(sum, weight, eps, fused == false ? false : null);
                return (sum.MoveToOuterDisposeScope(), normed.MoveToOuterDisposeScope());
            }
        }
    }
}
