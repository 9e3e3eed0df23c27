using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Models.Llama;

/// <summary>
/// Gemma's RMSNorm: y = cast(x · rsqrt(mean(x²) + eps) · (1 + w)), all in fp32 before the cast. The weight is stored as an
/// offset from one (zeros at init), so Gemma checkpoints cannot use Llama's norm. Parameter: weight (dim).
/// </summary>
public sealed class GemmaRMSNorm : nn.Module<Tensor, Tensor>
{
    public Parameter weight;

    public GemmaRMSNorm(long dim, double eps = 1e-6, ScalarType? dtype = null, Device? device = null) : base(nameof(GemmaRMSNorm))
    {
        this.eps = eps;
        weight = new Parameter(zeros(dim, dtype, device));
        RegisterComponents();
    }

    public double eps { get; }

    public override Tensor forward(Tensor input)
    {
        using var scope = NewDisposeScope();
        var x = input.to(ScalarType.Float32);
        var normed = x * (x.pow(2).mean([-1], keepdim: true) + eps).rsqrt();
        var y = normed * (weight.to(ScalarType.Float32) + 1.0);
        return y.to(input.dtype).MoveToOuterDisposeScope();
    }

    /// <summary>The norm a family uses: Gemma's (1 + w) form or Llama's w form.</summary>
    public static nn.Module<Tensor, Tensor> For(LlamaConfig config, long dim, ScalarType dtype, Device device) =>
        config.Family.GemmaNorm ? new GemmaRMSNorm(dim, config.RmsNormEps, dtype, device)
            : LoRAHub.TorchExtensions.torchx.nn.RMSNorm(dim, config.RmsNormEps, dtype, device);

    public override string ToString() => $"GemmaRMSNorm(({weight.size(0)},), eps={eps})";
}
