using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Tuners.Importance;

/// <summary>Which rank-1 components a budget keeps, from their scores across all groups (layers, heads) at once.</summary>
public static class BudgetMask
{
    /// <summary>
    /// Keep masks, one per group of <paramref name="scores"/>: a component is masked when its score is ≤ the k-th smallest
    /// score overall, k = (total components − <paramref name="budget"/>) — PEFT's mask_to_budget rule, so ties may mask a
    /// few more. A budget of every component or more keeps all.
    /// </summary>
    public static Tensor[] Keep(IReadOnlyList<Tensor> scores, int budget)
    {
        using var scope = torch.NewDisposeScope();
        var all = torch.cat(scores.Select(s => s.reshape(-1)).ToArray(), 0);
        var masked = (int)all.numel() - budget;
        var threshold = masked <= 0 ? double.NegativeInfinity : all.sort().Values.narrow(0, masked - 1, 1).ToDouble();
        return scores.Select(s => s.gt(threshold).MoveToOuterDisposeScope()).ToArray();
    }

    /// <summary>A keep mask as a 0/1 float tensor (for a checkpoint; <see cref="ToArray"/> reads it back).</summary>
    public static Tensor ToTensor(bool[] keep) => torch.tensor(keep.Select(k => k ? 1f : 0f).ToArray());

    /// <summary>A bool mask tensor as a managed array.</summary>
    public static bool[] ToArray(Tensor keep)
    {
        using var scope = torch.NewDisposeScope();
        return keep.reshape(-1).to(ScalarType.Float32).cpu().data<float>().Select(v => v > 0.5f).ToArray();
    }
}
