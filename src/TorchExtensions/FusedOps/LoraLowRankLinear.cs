using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// A projection that a fused LoRA block (<see cref="LoraFusion"/>) may compute itself, as
/// y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with a frozen W (and b) and at most one low-rank update. LoRA's layer implements it; a
/// plain frozen Linear is such a projection without an update.
/// </summary>
public interface ILowRankLinear
{
    /// <summary>
    /// The projection's parts when y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ is exactly what its forward computes now (one active,
    /// unmerged adapter without dropout, variant or bias; frozen base); otherwise null and, in <paramref name="reason"/>,
    /// why not (e.g. "dropout 0.05", "2 active adapters").
    /// </summary>
    LowRankParts? low_rank_parts(out string reason);
}

/// <summary>
/// W (out×in), b (out, or null), and the update's A (r×in), B (out×r) and scale s (A, B null: no update). A and B are
/// the trainable tensors themselves (any float dtype: the fused block computes in the activations' dtype, as LoRA's
/// layer does, and hands their gradients back in their own dtype). A quantized base has no <see cref="Weight"/> but a
/// <see cref="Dequantize"/> that makes W when a GEMM needs it (freed right after: no dense copy is kept).
/// </summary>
public sealed record LowRankParts(Tensor? Weight, Tensor? Bias, Tensor? A, Tensor? B, double Scaling)
{
    /// <summary>For a quantized base (<see cref="Weight"/> null): a new dense W (out×in) in <see cref="WeightDtype"/> per call, which the caller frees.</summary>
    public Func<Tensor>? Dequantize { get; init; }

    public long InFeatures { get; init; } = Weight?.size(1) ?? 0;
    public long OutFeatures { get; init; } = Weight?.size(0) ?? 0;

    /// <summary>The dtype the base's GEMMs run in (the weight's; a quantized base's compute dtype).</summary>
    public ScalarType WeightDtype { get; init; } = Weight?.dtype ?? ScalarType.Float32;

    /// <summary>Where the base's weight lives.</summary>
    public Device? WeightDevice { get; init; } = Weight?.device;

    /// <summary>True when there is a low-rank update.</summary>
    public bool HasUpdate => A is not null;

    /// <summary>The update's rank (0 without one).</summary>
    public long Rank => A?.size(0) ?? 0;

    /// <summary>The parts of a frozen quantized (or otherwise computed) base: W made by <see cref="ILinearLayer.dense_weight"/> when needed.</summary>
    public static LowRankParts FromComputedWeight(ILinearLayer layer, Tensor? bias, Tensor? a, Tensor? b, double scaling)
    {
        long outF = layer.out_features, inF = layer.in_features;
        return new LowRankParts(null, bias, a, b, scaling)
        {
            Dequantize = () =>
            {
                using var dense = layer.dense_weight();
                return dense.view(outF, inF);
            },
            InFeatures = inF, OutFeatures = outF, WeightDtype = layer.weight_dtype, WeightDevice = layer.weight_device,
        };
    }

    /// <summary>f(W): the dense weight itself, or a dequantized one freed when f returns.</summary>
    internal T WithWeight<T>(Func<Tensor, T> f)
    {
        if (Weight is not null) return f(Weight);
        using var w = Dequantize!();
        return f(w);
    }

    /// <summary>x·Wᵀ + b for x (tokens × in): one GEMM, with the bias as addmm's input (as F.linear does).</summary>
    internal Tensor BaseForward(Tensor x) => WithWeight(w => Bias is null ? x.mm(w.t()) : Bias.addmm(x, w.t()));

    /// <summary>
    /// The parts of <paramref name="module"/>: its own (<see cref="ILowRankLinear"/>), a TorchSharp Linear's weight and
    /// bias when both are frozen, or a 4-bit Linear's; otherwise null and why.
    /// </summary>
    public static LowRankParts? From(nn.Module module, out string reason)
    {
        switch (module)
        {
            case ILowRankLinear layer:
                return layer.low_rank_parts(out reason);
            case Linear linear:
                if (linear.weight is not { } w)
                {
                    reason = "Linear without weight";
                    return null;
                }
                if (w.requires_grad || linear.bias is { requires_grad: true })
                {
                    reason = "trainable base";
                    return null;
                }
                reason = "";
                return new LowRankParts(w, linear.bias, null, null, 0);
            case Modules.Linear4bit q:
                if (q.bias is { requires_grad: true })
                {
                    reason = "trainable base bias";
                    return null;
                }
                reason = "";
                return FromComputedWeight(q, q.bias, null, null, 0);
            default:
                reason = $"a {module.GetType().Name}";
                return null;
        }
    }
}
