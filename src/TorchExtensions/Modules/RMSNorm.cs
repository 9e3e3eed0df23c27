using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Modules;

/// <summary>
/// Root-mean-square layer normalisation over the last dimension with a learned scale (Llama's RMSNorm, PyTorch's
/// nn.RMSNorm): y = weight · cast(x · rsqrt(mean(x²) + eps)), normalised in fp32. Parameter: weight (dim). On CUDA one
/// fused kernel each way (<see cref="torchx.nn.functional.rms_norm"/>).
/// </summary>
public sealed class RMSNorm : nn.Module<Tensor, Tensor>
{
    public Parameter weight;

    public RMSNorm(long dim, double eps = 1e-6, ScalarType? dtype = null, Device? device = null) : base(nameof(RMSNorm))
    {
        this.eps = eps;
        weight = new Parameter(ones(dim, dtype, device));
        RegisterComponents();
    }

    public double eps { get; }

    public long normalized_shape => weight.size(0);

    public override Tensor forward(Tensor input) => torchx.nn.functional.rms_norm(input, weight, eps);

    public override string ToString() => $"RMSNorm(({normalized_shape},), eps={eps})";
}
