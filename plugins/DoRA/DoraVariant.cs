using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;
using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;
using Fused = LoRAHub.TorchExtensions.torchx.nn.functional.Fused;

namespace LoRAHub.Plugins.DoRA;

/// <summary>
/// DoRA (Liu et al. 2024) as a LoRA variant, PEFT's DoraLinearVariant: W' = m ⊙ V / ‖V‖ with V = W0 + s·B·A and the
/// norm per output row. Forward reuses the base output: y = base(x) + (m/‖V‖ − 1)·(base(x) − bias) + (m/‖V‖)·s·B·A·x,
/// which PEFT also computes (its "base_result" path) whenever dropout is the identity; with active dropout PEFT applies
/// W0 to dropout(x) instead, and so does this (one more matmul with W0).
/// </summary>
public sealed partial class DoraVariant(DoraOptions options) : ILoraVariant
{
    public const string MagnitudeKey = "lora_magnitude_vector";

    public DoraOptions Options { get; } = options;

    public string ConfigFlag => DoraMethod.ConfigFlag;

    public LoraOptions CreateOptions() => new DoraOptions();

    /// <summary>The adapter's DoRA state on the layer.</summary>
    public static DoraLinearLayer Layer(LoraLinear layer, string adapter) => (DoraLinearLayer)Magnitudes(layer)[adapter];

    /// <summary>The adapter's DoRA state on the layer, or null when it has none (nothing is created).</summary>
    internal static DoraLinearLayer? TryLayer(LoraLinear layer, string adapter) =>
        layer.named_children().FirstOrDefault(c => c.name == MagnitudeKey).module is ModuleDict dict && dict.ContainsKey(adapter)
            ? dict[adapter] as DoraLinearLayer
            : null;

    // The layers this adapter lives on, whose step norms are computed together (DoraNormGroup).
    private readonly DoraNormGroup group = new();

    private static ModuleDict Magnitudes(LoraLinear layer)
    {
        if (layer.named_children().FirstOrDefault(c => c.name == MagnitudeKey).module is ModuleDict existing) return existing;
        var dict = new ModuleDict();
        dict.train(layer.training);
        layer.register_module(MagnitudeKey, dict);
        return dict;
    }

    /// <summary>m = ‖W0 + s·B·A‖ with the initialised A and B (PEFT), so the layer starts equal to W0 + s·B·A (= W0 when B = 0).</summary>
    public void Init(LoraLinear layer, string adapter)
    {
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var magnitude = new Parameter(empty([layer.base_linear.out_features], layer.A(adapter).dtype, layer.base_linear.weight_device));
        var dora = new DoraLinearLayer((Parameter)magnitude.DetachFromDisposeScope());
        dora.train(layer.training);
        Magnitudes(layer).Set(adapter, dora);
        group.Add(layer, adapter);
        // The same computation forward does outside a training step, so m/‖V‖ is exactly 1 at init there (a step's grouped
        // kernel sums in another order: 1 within fp32 rounding).
        dora.weight.copy_(WeightNorm(layer, adapter, layer.base_linear.dense_weight()));
    }

    /// <summary>
    /// ‖W0 + s·B·A‖ per row in the accumulation dtype, by the configured method (Factored: on CUDA and without autograd
    /// the direct kernel, <see cref="LoraWeightNorms.low_rank_row_norms"/>); autograd sees it unless detached.
    /// </summary>
    public Tensor WeightNorm(LoraLinear layer, string adapter, Tensor w0) => WeightNorm(layer, adapter, w0, into: null);

    // into: where the kernel may write the norm (a cache's stale norm), or null.
    private Tensor WeightNorm(LoraLinear layer, string adapter, Tensor w0, Tensor? into)
    {
        var a = layer.A(adapter);
        var b = layer.B(adapter);
        var s = layer.Scaling(adapter);
        if (Options.NormMethod == DoraNormMethod.Direct) return DoraWeightNorm.Direct(w0, a, b, s);
        // Without autograd, on CUDA: one kernel forms V's rows in fp32 registers (exact V, no cached ‖W0‖²); one launch
        // where the factored ops take about twelve, for every projection of every step (DoRA's host time).
        if (Fused.DoraNorm && !(is_grad_enabled() && (a.requires_grad || b.requires_grad))
            && LoraWeightNorms.low_rank_row_norms(w0, a, b, s, into) is { } direct)
            return direct;
        var acc = DoraWeightNorm.AccumulationType(a);
        // ‖W0_i‖² (W0 is frozen) is kept for the rest of a training step; outside one it is computed each time.
        var key = new DoraLinearLayer.BaseKey(layer.StepToken ?? 0, layer.BaseWeightVersion, DenseWeight(layer), acc, w0.device_type, w0.device_index);
        var baseNorms = Layer(layer, adapter).BaseNormsSquared(key, cache: layer.StepToken is not null, () =>
        {
            using var _ = no_grad();
            return DoraWeightNorm.RowNormsSquared(w0, acc);
        });
        // One call into the DoRA kernels library (composite ops where it has none); the C# ops are the reference.
        return Fused.DoraNorm ? DoraOps.dora_weight_norm(w0, baseNorms, a, b, s) : DoraWeightNorm.Factored(w0, baseNorms, a, b, s);
    }

    /// <summary>
    /// The norm for forward. Detached (DoRA's default) it depends only on W0, A, B and s, none of which changes during a
    /// training step before its optimizer step, so it is cached on the layer for the step (<see cref="DoraLinearLayer.NormKey"/>):
    /// with activation checkpointing the recompute reuses the forward's norm, and so do later micro-batches. Outside a
    /// step (no <see cref="LoraLinear.StepToken"/>) it is computed on every call, as PEFT does: without a version counter
    /// (TorchSharp has no tensor._version) a cache there could not tell that a tensor was written in place. Not
    /// detached, it is computed with autograd on every call.
    /// </summary>
    private Tensor ForwardNorm(LoraLinear layer, string adapter, DoraLinearLayer dora) => ForwardNorm(layer, adapter, dora, out _);

    // The same, and the step's cache key where the norm went through the cache (null otherwise).
    private Tensor ForwardNorm(LoraLinear layer, string adapter, DoraLinearLayer dora, out DoraLinearLayer.NormKey? cacheKey)
    {
        cacheKey = null;
        var detached = Options.DetachNorm || !is_grad_enabled();
        if (!detached)
        {
            using var grad = enable_grad();
            return WeightNorm(layer, adapter, layer.base_linear.dense_weight());
        }
        using var _ = no_grad();
        if (!Fused.DoraNorm || !Options.DetachNorm || layer.StepToken is not { } step)
            return WeightNorm(layer, adapter, layer.base_linear.dense_weight());
        var key = NormKeyOf(layer, adapter, step);
        cacheKey = key;
        // A norm of the step's grouped launch may still be in flight on its side stream: libtorch's stream waits for it first.
        if (dora.CachedNorm(key) is { } cached)
        {
            group.EnsureReady(dora);
            return cached;
        }
        // The step's first miss computes every layer's norm of this adapter in one launch (DoraNormGroup), this one's too
        // unless it cannot take the grouped kernel.
        if (Options.NormMethod == DoraNormMethod.Factored && group.Fill(this, step, layer.A(adapter)) && dora.CachedNorm(key) is { } grouped)
        {
            group.EnsureReady(dora);
            return grouped;
        }
        // A quantized base dequantizes here, on a miss only. The kernel writes over an earlier step's norm (no allocation).
        var norm = WeightNorm(layer, adapter, layer.base_linear.dense_weight(), into: dora.StaleNorm(step));
        dora.CacheNorm(key, norm);
        return norm;
    }

    /// <summary>The key of the adapter's detached norm on the layer in training step <paramref name="step"/> (<see cref="DoraLinearLayer.NormKey"/>).</summary>
    internal DoraLinearLayer.NormKey NormKeyOf(LoraLinear layer, string adapter, long step) =>
        new(step, layer.BaseWeightVersion, layer.AdapterWeightsVersion, torchx.data_ptr(layer.A(adapter)), torchx.data_ptr(layer.B(adapter)),
            DenseWeight(layer), layer.Scaling(adapter));

    // The dense base weight as a tensor (its native handle): a moved or re-created weight is a new tensor, while
    // StackedBases re-homing it into a stack (set_, the same values) keeps it, so the step's norms stay valid across that
    // (its storage pointer would miss, and each re-homed projection compute its norm again). A quantized base's dense
    // weight is a fresh tensor each time, and its writes go through the layer (BaseWeightVersion).
    private static IntPtr DenseWeight(LoraLinear layer) => layer.base_layer is Linear { weight: { } w } ? w.Handle : IntPtr.Zero;

    public Tensor Forward(LoraLinear layer, string adapter, Tensor x, Tensor result)
    {
        using var scope = NewDisposeScope();
        var linear = layer.base_linear;
        var dora = Layer(layer, adapter);
        var norm = ForwardNorm(layer, adapter, dora);

        // Mixed precision as in LoraLinear: fp32 masters cast to the activations' dtype for the matmuls. The correction
        // m/‖V‖ − 1 is formed in fp32 (the magnitude's dtype) and only then used with the activations, so a small
        // deviation from 1 keeps its bits in bf16.
        var computeType = x.dtype;
        Tensor a = layer.A(adapter), b = layer.B(adapter);
        if (a.dtype != computeType) a = a.to(computeType);
        if (b.dtype != computeType) b = b.to(computeType);
        var s = layer.Scaling(adapter);
        var dropout = (nn.Module<Tensor, Tensor>)layer.lora_dropout[adapter];
        var identity = dropout is Dropout { p: 0 } || !dropout.training;

        Tensor output;
        if (identity)
        {
            // t = base(x) + s·B·A·x in one accumulating GEMM; y = t + (m/‖V‖ − 1)·(t − bias): on CUDA one fused kernel
            // each way, which keeps y instead of t for backward (DoraOps.dora_output).
            var outFeatures = result.size(-1);
            var xa = F.linear(x, a);
            var t = torchx.addmm(result.reshape(-1, outFeatures), xa.reshape(-1, xa.size(-1)), b.t(), beta: 1.0, alpha: s).view(result.shape);
            output = DoraOps.dora_output(t, dora.weight, norm, linear.bias);
        }
        else
        {
            var scale = dora.weight.div(norm);                                // m/‖V‖: gradient to m (and to A, B if not detached)
            var correction = scale.sub(1.0);
            if (correction.dtype != computeType) correction = correction.to(computeType);
            var xd = dropout.call(x);
            var w0 = linear.dense_weight();
            var w = w0.dtype == computeType ? w0 : w0.to(computeType);
            var baseOfDropped = F.linear(xd, w);                          // PEFT: W0·dropout(x), no bias
            var lora = F.linear(F.linear(xd, a), b);
            var loraScale = scale.mul(s);
            if (loraScale.dtype != computeType) loraScale = loraScale.to(computeType);
            output = result.addcmul(baseOfDropped, correction, 1).addcmul(lora, loraScale, 1);
        }
        return output.MoveToOuterDisposeScope();
    }

    /// <summary>W ← (m/‖V‖)·(W0 + s·B·A), added to W as a delta (dense or quantized base); m/‖V‖ is kept for unmerge.</summary>
    public void Merge(LoraLinear layer, string adapter)
    {
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var dora = Layer(layer, adapter);
        var w0 = layer.base_linear.dense_weight();
        var factor = dora.weight.div(WeightNorm(layer, adapter, w0));
        var acc = factor.dtype;
        // delta = (f − 1)·W0 + s·(f ⊙ B)·A, built in one widened copy of W0.
        var delta = Widened(w0, acc).mul_(factor.sub(1.0).unsqueeze(1));
        torchx.addmm_(delta, layer.B(adapter).to(acc).mul(factor.unsqueeze(1)), layer.A(adapter).to(acc), beta: 1.0, alpha: layer.Scaling(adapter));
        layer.AddToBaseWeight(delta);
        dora.MergeFactor?.Dispose();
        dora.MergeFactor = factor.DetachFromDisposeScope();
    }

    /// <summary>W0 = W'/f − s·B·A with the factor f of the merge (PEFT's unmerge), applied as a delta.</summary>
    public void Unmerge(LoraLinear layer, string adapter)
    {
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var dora = Layer(layer, adapter);
        var factor = dora.MergeFactor ?? throw new InvalidOperationException($"DoRA adapter '{adapter}' is not merged");
        var acc = factor.dtype;
        // delta = W'·(1/f − 1) − s·B·A
        var delta = Widened(layer.base_linear.dense_weight(), acc).mul_(factor.reciprocal().sub(1.0).unsqueeze(1));
        torchx.addmm_(delta, layer.B(adapter).to(acc), layer.A(adapter).to(acc), beta: 1.0, alpha: -layer.Scaling(adapter));
        layer.AddToBaseWeight(delta);
        factor.Dispose();
        dora.MergeFactor = null;
    }

    // A new tensor in dtype (never W itself: the caller writes into it).
    private static Tensor Widened(Tensor w, ScalarType dtype) => w.dtype == dtype ? w.clone() : w.to(dtype);

    /// <summary>Drops the adapter's magnitude (and a pending merge factor) from the layer.</summary>
    public void Delete(LoraLinear layer, string adapter)
    {
        group.Remove(layer, adapter);
        Magnitudes(layer).Remove(adapter); // DoraLinearLayer's Dispose frees a pending merge factor
    }

    public IEnumerable<(string key, Parameter tensor)> Tensors(LoraLinear layer, string adapter)
    {
        yield return (MagnitudeKey, Layer(layer, adapter).weight);
    }

    public IEnumerable<(string key, long[] shape)> Shapes(ILinearLayer baseLayer, int r)
    {
        yield return (MagnitudeKey, [baseLayer.out_features]);
    }
}
