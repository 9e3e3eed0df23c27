using static TorchSharp.torch;

namespace LoRAHub.Tuners.Lora.Merging;

/// <summary>
/// PEFT's utils/merge_utils.py: ways to combine task tensors (one per adapter, same shape) with one weight each —
/// task arithmetic, TIES (trim, elect sign, disjoint merge), DARE (random drop with rescale) and magnitude pruning.
/// Inputs are not modified; results are new tensors.
/// </summary>
public static class MergeUtils
{
    /// <summary>Keeps the ⌊density·numel⌋ entries of largest magnitude, zeroes the rest.</summary>
    public static Tensor MagnitudeBasedPruning(Tensor tensor, double density)
    {
        using var scope = NewDisposeScope();
        var flat = tensor.reshape(-1);
        var mask = zeros_like(flat);
        var k = (long)(density * tensor.numel());
        if (k > 0)
        {
            var (_, indices) = flat.abs().topk((int)k, largest: true);
            mask.index_fill_(0, indices, 1);
        }
        return tensor.mul(mask.reshape(tensor.shape)).MoveToOuterDisposeScope();
    }

    /// <summary>Keeps each entry with probability density (Bernoulli); with <paramref name="rescale"/> the kept ones are divided by density.</summary>
    public static Tensor RandomPruning(Tensor tensor, double density, bool rescale)
    {
        using var scope = NewDisposeScope();
        var mask = bernoulli(full_like(tensor, density));
        var pruned = tensor.mul(mask);
        if (rescale) pruned = pruned.div(density);
        return pruned.MoveToOuterDisposeScope();
    }

    /// <summary>PEFT's prune: "magnitude" or "random"; density ≥ 1 keeps everything, density &lt; 0 is an error.</summary>
    public static Tensor Prune(Tensor tensor, double density, string method, bool rescale = false)
    {
        if (density >= 1) return tensor.clone();
        if (density < 0 || double.IsNaN(density)) throw new ArgumentException($"density should be >= 0, got {density}");
        return method switch
        {
            "magnitude" => MagnitudeBasedPruning(tensor, density),
            "random" => RandomPruning(tensor, density, rescale),
            _ => throw new ArgumentException($"unknown pruning method '{method}'; use \"magnitude\" or \"random\""),
        };
    }

    /// <summary>
    /// Where each entry's sign agrees with the elected sign over the stacked tensors (dim 0): the sign of the sum
    /// ("total") or of the sum of signs ("frequency"); ties elect +.
    /// </summary>
    public static Tensor CalculateMajoritySignMask(Tensor stacked, string method = "total")
    {
        using var scope = NewDisposeScope();
        var sign = stacked.sign();
        var magnitude = method switch
        {
            "total" => stacked.sum(dim: 0),
            "frequency" => sign.sum(dim: 0),
            _ => throw new ArgumentException($"majority_sign_method must be \"total\" or \"frequency\", got \"{method}\""),
        };
        var majority = where(magnitude.ge(0), ones_like(magnitude), ones_like(magnitude).neg());
        return sign.eq(majority).MoveToOuterDisposeScope();
    }

    /// <summary>Mean over dim 0 of the entries the mask keeps (entries nobody keeps: 0).</summary>
    public static Tensor DisjointMerge(Tensor stacked, Tensor majoritySignMask)
    {
        using var scope = NewDisposeScope();
        var mask = majoritySignMask.to(stacked.dtype);
        var mixed = stacked.mul(mask).sum(dim: 0);
        var preserved = mask.sum(dim: 0).clamp_min(1.0);
        return mixed.div(preserved).MoveToOuterDisposeScope();
    }

    /// <summary>Σ wᵢ·tᵢ.</summary>
    public static Tensor TaskArithmetic(IReadOnlyList<Tensor> tensors, IReadOnlyList<double> weights) => WeightedSum(tensors, weights);

    /// <summary>Σ wᵢ·magnitude_prune(tᵢ, density).</summary>
    public static Tensor MagnitudePrune(IReadOnlyList<Tensor> tensors, IReadOnlyList<double> weights, double density) =>
        WeightedSum(tensors.Select(t => Prune(t, density, "magnitude")).ToList(), weights, dispose: true);

    /// <summary>TIES: magnitude-prune each, elect a sign per entry, mean of the weighted entries that agree with it.</summary>
    public static Tensor Ties(IReadOnlyList<Tensor> tensors, IReadOnlyList<double> weights, double density, string majoritySignMethod = "total") =>
        SignElected(tensors.Select(t => Prune(t, density, "magnitude")).ToList(), weights, majoritySignMethod);

    /// <summary>DARE linear: randomly drop each with keep-probability density (rescaled by 1/density), then Σ wᵢ·tᵢ.</summary>
    public static Tensor DareLinear(IReadOnlyList<Tensor> tensors, IReadOnlyList<double> weights, double density) =>
        WeightedSum(tensors.Select(t => Prune(t, density, "random", rescale: true)).ToList(), weights, dispose: true);

    /// <summary>DARE TIES: DARE's random drop, then TIES' sign election and disjoint merge.</summary>
    public static Tensor DareTies(IReadOnlyList<Tensor> tensors, IReadOnlyList<double> weights, double density, string majoritySignMethod = "total") =>
        SignElected(tensors.Select(t => Prune(t, density, "random", rescale: true)).ToList(), weights, majoritySignMethod);

    private static Tensor SignElected(List<Tensor> pruned, IReadOnlyList<double> weights, string method)
    {
        using var scope = NewDisposeScope();
        var stacked = stack(pruned, 0);
        foreach (var t in pruned) t.Dispose();
        var mask = CalculateMajoritySignMask(stacked, method);
        return DisjointMerge(stacked.mul(WeightColumn(weights, stacked)), mask).MoveToOuterDisposeScope();
    }

    private static Tensor WeightedSum(IReadOnlyList<Tensor> tensors, IReadOnlyList<double> weights, bool dispose = false)
    {
        if (tensors.Count == 0 || tensors.Count != weights.Count)
            throw new ArgumentException($"give one weight per tensor ({tensors.Count} tensors, {weights.Count} weights)");
        using var scope = NewDisposeScope();
        var stacked = stack(tensors, 0);
        if (dispose) foreach (var t in tensors) t.Dispose();
        return stacked.mul(WeightColumn(weights, stacked)).sum(dim: 0).MoveToOuterDisposeScope();
    }

    // The weights as a (n, 1, 1, ...) tensor that broadcasts over the stacked tensors (PEFT's reshape_weight_task_tensors).
    private static Tensor WeightColumn(IReadOnlyList<double> weights, Tensor stacked)
    {
        var shape = new long[stacked.dim()];
        Array.Fill(shape, 1L);
        shape[0] = weights.Count;
        return tensor(weights.ToArray(), dtype: stacked.dtype, device: stacked.device).view(shape);
    }
}
