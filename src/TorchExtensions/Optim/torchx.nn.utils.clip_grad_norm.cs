using LoRAHub.TorchExtensions.Cuda;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    public static partial class nn
    {
        public static partial class utils
        {
            /// <summary>
            /// Scales the gradients so their total 2-norm is at most <paramref name="max_norm"/> (when it is positive);
            /// returns the norm before clipping (PyTorch's clip_grad_norm_, coefficient max_norm / (norm + 1e-6) capped at
            /// 1). CUDA gradients of fp32/fp16/bf16 take two multi-tensor kernels (sum of squares, scale) per device;
            /// others per-tensor norms in fp32. A non-finite norm leaves the gradients as they are.
            /// </summary>
            public static double clip_grad_norm_(IEnumerable<Tensor> parameters, double max_norm)
            {
                using var scope = NewDisposeScope();
                using var noGrad = no_grad();
                var grads = new List<Tensor>();
                foreach (var p in parameters)
                    if (p.grad is { } g) grads.Add(g);
                if (grads.Count == 0) return 0;
                var fused = grads.All(g => KernelTensors.Usable(g) && g.is_contiguous()) &&
                            grads.Select(KernelTensors.DeviceIndex).Distinct().ToList().All(MultiTensorKernels.TryPrepare);
                double total;
                Dictionary<int, List<MultiTensorKernels.Item>>? byDevice = null;
                if (fused)
                {
                    byDevice = grads.GroupBy(KernelTensors.DeviceIndex).ToDictionary(d => d.Key, d => d.Select(g =>
                        new MultiTensorKernels.Item(IntPtr.Zero, KernelTensors.Ptr(g), IntPtr.Zero, IntPtr.Zero, g.numel(), g.dtype, g.dtype, g.dtype)).ToList());
                    var sumsq = 0.0;
                    foreach (var (device, items) in byDevice) sumsq += MultiTensorKernels.GradSumOfSquares(device, items).item<double>();
                    total = Math.Sqrt(sumsq);
                }
                else
                {
                    var norms = grads.Select(g => torch.linalg.vector_norm(g.dtype == ScalarType.Float32 ? g : g.to(ScalarType.Float32), 2)).ToArray();
                    total = torch.linalg.vector_norm(stack(norms), 2).item<float>();
                }
                if (max_norm <= 0 || !double.IsFinite(total)) return total;
                var coef = max_norm / (total + 1e-6);
                if (coef >= 1) return total;
                if (fused)
                    foreach (var (device, items) in byDevice!) MultiTensorKernels.ScaleGrads(device, items, (float)coef);
                else
                    foreach (var g in grads) g.mul_(coef);
                return total;
            }
        }
    }
}
