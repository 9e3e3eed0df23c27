using static TorchSharp.torch;

namespace LoRAHub.Tuners.Lora.Merging;

/// <summary>
/// PEFT's add_weighted_adapter per layer: the new adapter's A (r×in) and B (out×r) from the source adapters of one
/// <see cref="LoraLinear"/> and one weight each. The new adapter has scaling 1 (r = lora_alpha).
/// </summary>
public static class WeightedAdapter
{
    /// <summary>Every combination_type PEFT accepts.</summary>
    public static readonly IReadOnlyList<string> CombinationTypes =
    [
        "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
        "magnitude_prune_svd",
    ];

    /// <summary>Types that combine A and B separately (and so need equal ranks).</summary>
    public static bool IsFactorwise(string type) => type is "linear" or "ties" or "dare_linear" or "dare_ties" or "magnitude_prune";

    /// <summary>
    /// "cat": A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …] in the first rows/columns (exact: B·A = Σ wᵢsᵢBᵢAᵢ); the rest zero.
    /// </summary>
    public static (Tensor a, Tensor b) Cat(LoraLinear layer, IReadOnlyList<(string name, double weight)> sources, int rank)
    {
        using var scope = NewDisposeScope();
        var (a, b) = Zeros(layer, sources[0].name, rank);
        long offset = 0;
        foreach (var (name, weight) in sources)
        {
            var r = layer.Rank(name);
            a.narrow(0, offset, r).copy_(layer.A(name).mul(weight * layer.Scaling(name)));
            b.narrow(1, offset, r).copy_(layer.B(name));
            offset += r;
        }
        return (a.MoveToOuterDisposeScope(), b.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// linear, ties, dare_linear, dare_ties, magnitude_prune on A and B separately (PEFT's
    /// _generalized_task_arithmetic_weighted_adapter): A's weights √|wᵢsᵢ|·sign(wᵢsᵢ), B's √|wᵢsᵢ|, so for one adapter
    /// B·A = w·s·B₁A₁.
    /// </summary>
    public static (Tensor a, Tensor b) Factorwise(LoraLinear layer, IReadOnlyList<(string name, double weight)> sources, string type,
        double density, string majoritySignMethod)
    {
        var ranks = sources.Select(s => layer.Rank(s.name)).Distinct().ToList();
        if (ranks.Count != 1)
            throw new InvalidOperationException($"combination_type \"{type}\" combines A and B entry by entry, so every adapter needs the same rank; " +
                $"ranks here are {string.Join(", ", sources.Select(s => $"{s.name}: {layer.Rank(s.name)}"))}. Use \"cat\" or an \"_svd\" type");
        var scaled = sources.Select(s => s.weight * layer.Scaling(s.name)).ToList();
        var weightsA = scaled.Select(w => Math.Sqrt(Math.Abs(w)) * (w >= 0 ? 1 : -1)).ToList();
        var weightsB = scaled.Select(w => Math.Sqrt(Math.Abs(w))).ToList();
        var a = Combine(sources.Select(s => (Tensor)layer.A(s.name)).ToList(), weightsA, type, density, majoritySignMethod);
        var b = Combine(sources.Select(s => (Tensor)layer.B(s.name)).ToList(), weightsB, type, density, majoritySignMethod);
        return (a, b);
    }

    /// <summary>
    /// The "_svd" types and "svd" (PEFT's _svd_generalized_task_arithmetic_weighted_adapter): the deltas sᵢBᵢAᵢ combined
    /// with weights wᵢ·sᵢ — PEFT multiplies by the scaling a second time here, and so does this, to give the same adapter —
    /// then truncated to <paramref name="rank"/> by SVD: B = U·S, A = Vh; <paramref name="clamp"/> clips both to the
    /// quantile of their entries. Ranks above min(out, in) leave zero rows.
    /// </summary>
    public static (Tensor a, Tensor b) Svd(LoraLinear layer, IReadOnlyList<(string name, double weight)> sources, string type, int rank,
        double density, string majoritySignMethod, double? clamp, bool fullMatrices)
    {
        using var scope = NewDisposeScope();
        var deltas = sources.Select(s => layer.DeltaWeight(s.name)).ToList();
        var weights = sources.Select(s => s.weight * layer.Scaling(s.name)).ToList();
        var delta = Combine(deltas, weights, type == "svd" ? "linear" : type[..^"_svd".Length], density, majoritySignMethod);
        var (u, s, vh) = linalg.svd(delta, fullMatrices: fullMatrices);
        var k = Math.Min(rank, s.size(0));
        var newB = u.narrow(1, 0, k).mul(s.narrow(0, 0, k).unsqueeze(0));
        var newA = vh.narrow(0, 0, k);
        if (clamp is { } q)
        {
            var hi = Quantile(cat([newB.flatten(), newA.flatten()]), q);
            newB = newB.clamp(-hi, hi);
            newA = newA.clamp(-hi, hi);
        }
        var (a, b) = Zeros(layer, sources[0].name, rank);
        a.narrow(0, 0, k).copy_(newA);
        b.narrow(1, 0, k).copy_(newB);
        return (a.MoveToOuterDisposeScope(), b.MoveToOuterDisposeScope());
    }

    private static Tensor Combine(List<Tensor> tensors, List<double> weights, string type, double density, string majoritySignMethod) => type switch
    {
        "svd" or "linear" => MergeUtils.TaskArithmetic(tensors, weights),
        "ties" => MergeUtils.Ties(tensors, weights, density, majoritySignMethod),
        "dare_linear" => MergeUtils.DareLinear(tensors, weights, density),
        "dare_ties" => MergeUtils.DareTies(tensors, weights, density, majoritySignMethod),
        "magnitude_prune" => MergeUtils.MagnitudePrune(tensors, weights, density),
        _ => throw new ArgumentException($"invalid combination_type \"{type}\"; use one of {string.Join(", ", CombinationTypes)}"),
    };

    // torch.quantile's default (linear interpolation between the two nearest ranks).
    private static double Quantile(Tensor values, double q)
    {
        var sorted = values.sort().Values;
        var position = q * (sorted.numel() - 1);
        long lo = (long)Math.Floor(position), hi = (long)Math.Ceiling(position);
        double low = sorted[lo].to(ScalarType.Float64).item<double>(), high = sorted[hi].to(ScalarType.Float64).item<double>();
        return low + (high - low) * (position - lo);
    }

    private static (Tensor a, Tensor b) Zeros(LoraLinear layer, string like, int rank)
    {
        var a = layer.A(like);
        return (zeros(rank, layer.base_linear.in_features, a.dtype, a.device), zeros(layer.base_linear.out_features, rank, a.dtype, a.device));
    }
}
