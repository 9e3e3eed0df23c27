using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// A projection that a fused LoRA block (<see cref="LoraFusion"/>) may compute itself, as
/// y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with a frozen W (and b) and at most one low-rank update, or with a per-output-row scale c
/// (<see cref="LowRankParts.RowScale"/>) y = c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b, which is DoRA with its norm detached. LoRA's
/// layer implements it; a plain frozen Linear is such a projection without an update.
/// </summary>
public interface ILowRankLinear
{
    /// <summary>
    /// The projection's parts when they give exactly what its forward computes now (one active, unmerged adapter without
    /// dropout or bias, and no variant unless it supplies a row scale, as DoRA does; frozen base); otherwise null and, in
    /// <paramref name="reason"/>, why not (e.g. "dropout 0.05", "2 active adapters").
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

    /// <summary>
    /// An optional per-output-row scale (DoRA with its norm detached): the projection is then
    /// y = c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b. Called once per fused call, after every check passed; it returns c (out, any float
    /// dtype, kept at its own precision: fp32 masters stay fp32), which the fused function takes as an autograd input, so
    /// c's gradient Σ_tokens dy ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) flows on through ordinary autograd (e.g. c = m/‖V‖ to m). Null: c = 1.
    /// </summary>
    public Func<Tensor>? RowScale { get; init; }

    /// <summary>
    /// A row scale of the form c = m/n with n constant (DoRA with its norm detached: m the magnitude, n = ‖V‖), taken
    /// instead of <see cref="RowScale"/> where set: called once per fused call, it returns c's values (any float dtype, no
    /// autograd needed), m (the autograd input in c's place, which takes the gradient) and n (out, fp32). The fused
    /// function computes with c and returns m's gradient dc/n, the division made by the launch that sums dc
    /// (<see cref="LoraRowScaleKernels.RowScaleBackward"/>, <see cref="LoraRowScaleKernels.SwiGluBackward"/>), with the bits
    /// autograd's division backward would give: no division node, launch or backward launch per projection.
    /// </summary>
    public Func<(Tensor c, Tensor magnitude, Tensor divisor)>? DividedRowScale { get; init; }

    /// <summary>True when the projection has a per-output-row scale (<see cref="RowScale"/> or <see cref="DividedRowScale"/>).</summary>
    public bool HasRowScale => RowScale is not null || DividedRowScale is not null;

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
    /// The base part of the unscaled output: x·Wᵀ + b without a row scale, x·Wᵀ with one (the bias is added after the
    /// scale, in <see cref="ScaleRows_"/>).
    /// </summary>
    internal Tensor InnerForward(Tensor x) => HasRowScale ? WithWeight(w => x.mm(w.t())) : BaseForward(x);

    /// <summary>
    /// inner ← c ⊙ inner + b in place (inner from <see cref="InnerForward"/>). The multiply computes in the wider of the
    /// two dtypes and rounds once, so an fp32 c close to 1 keeps its bits with bf16 activations, as DoRA's output kernel
    /// does; the bias is added after that rounding. On CUDA one vectorized kernel pass with the same bits
    /// (<see cref="LoraRowScaleKernels.ScaleRows_"/>: the mixed-dtype multiply of the tensor ops is a slow non-vectorized
    /// pass); the tensor ops elsewhere.
    /// </summary>
    internal void ScaleRows_(Tensor inner, Tensor c)
    {
        if (LoraRowScaleKernels.AppliesToScale(inner, c, Bias))
        {
            LoraRowScaleKernels.ScaleRows_(inner, c, Bias);
            return;
        }
        inner.mul_(c);
        if (Bias is { } b) inner.add_(b);
    }

    /// <summary>
    /// The gradient of the row scale c of y = c ⊙ inner + b: Σ_tokens dy ⊙ inner, with inner recovered from the output as
    /// (y − b)/c, i.e. (Σ dy ⊙ (y − b))/c, summed in fp32 (fp64 for fp64). Exact up to the rounding of y (relative
    /// 2⁻⁹ in bf16, far below the rounding of dy itself); the recovery DoRA's CUDA output kernel makes, and like it 0
    /// where c is exactly 0 (m = 0: inner cannot be recovered there). Saving inner instead would cost a tokens × out tensor,
    /// or recomputing the output, per projection. <paramref name="inPlace"/>: y may be overwritten (a tensor kept only for this).
    /// </summary>
    internal Tensor RowScaleGrad(Tensor y, Tensor dy, Tensor c, bool inPlace, Tensor? divisor = null)
    {
        var acc = y.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        // y − b first (not Σ dy⊙y − b·Σ dy, which cancels where the bias dominates); a new tensor unless y may be overwritten.
        var centered = Bias is { } b ? inPlace ? y.sub_(b) : y.sub(b) : inPlace ? y : null;
        var product = centered is null ? y.mul(dy) : centered.mul_(dy);
        var sum = product.sum(0L, false, acc);
        var cAcc = c.dtype == acc ? c : c.to(acc);
        var dc = where(cAcc.eq(0), zeros_like(sum), sum.div_(cAcc));
        // m's gradient for c = m/n (DividedRowScale): autograd's division backward, dc / n.
        return divisor is null ? dc : dc.div_(divisor.dtype == acc ? divisor : divisor.to(acc));
    }

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
