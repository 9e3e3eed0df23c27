using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.AdaLoRA;

/// <summary>
/// AdaLoRA's budget (PEFT's RankAllocator): the sensitivity of every adapter entry, I = |w·∂L/∂w|, smoothed by EMA
/// (β1) with an EMA of its uncertainty |I − Ī| (β2); a triplet's score is s(E_i) + mean s(A_i,·) + mean s(B_·,i) with
/// s = Ī·Ū. The budget (number of unmasked triplets) falls cubically from init to target; masking zeroes E of the
/// lowest-scoring triplets.
/// </summary>
public sealed class RankAllocator(IReadOnlyList<SvdLinear> layers, AdaLoraOptions options) : IDisposable
{
    private readonly Dictionary<Tensor, (Tensor avg, Tensor unc)> state = new(ReferenceEqualityComparer.Instance);

    public int InitialBudget { get; } = layers.Sum(l => l.Rank);

    public int TargetBudget { get; } = options.TargetR * layers.Count;

    /// <summary>(budget, whether to mask at this step), PEFT's budget_schedule.</summary>
    public (int budget, bool mask) BudgetSchedule(long step)
    {
        int tinit = options.Tinit, tfinal = options.Tfinal, total = options.TotalStep!.Value;
        if (step <= tinit) return (InitialBudget, false);
        if (step > total - tfinal) return (TargetBudget, true);
        var remaining = 1 - (double)(step - tinit) / (total - tfinal - tinit);
        var budget = (int)((InitialBudget - TargetBudget) * Math.Pow(remaining, 3) + TargetBudget);
        return (budget, step % options.DeltaT == 0);
    }

    /// <summary>Updates the smoothed sensitivities from the current gradients (call after backward).</summary>
    public void UpdateImportance()
    {
        using var _ = torch.no_grad();
        foreach (var layer in layers)
            foreach (var p in new[] { layer.A, layer.E, layer.B })
            {
                using var scope = torch.NewDisposeScope();
                if (p.grad is not { } grad) continue;
                var ipt = p.mul(grad).abs();
                if (!state.TryGetValue(p, out var s))
                {
                    s = (torch.zeros_like(p).DetachFromDisposeScope(), torch.zeros_like(p).DetachFromDisposeScope());
                    state[p] = s;
                }
                s.avg.mul_(options.Beta1).add_(ipt, alpha: 1 - options.Beta1);
                s.unc.mul_(options.Beta2).add_(ipt.sub(s.avg).abs(), alpha: 1 - options.Beta2);
            }
    }

    /// <summary>Score per triplet of each layer (length = rank).</summary>
    public Tensor[] TripletScores()
    {
        using var scope = torch.NewDisposeScope();
        var scores = layers.Select(l =>
        {
            Tensor Score(Tensor p) => state.TryGetValue(p, out var s) ? s.avg.mul(s.unc) : torch.zeros_like(p);
            var e = Score(l.E).view(-1);
            var a = Score(l.A).mean([1]);
            var b = Score(l.B).mean([0]);
            return e.add(a).add(b).MoveToOuterDisposeScope();
        }).ToArray();
        return scores;
    }

    /// <summary>Keeps the `budget` highest-scoring triplets, zeroes E of the others; returns each layer's keep mask.</summary>
    public bool[][] MaskToBudget(int budget)
    {
        using var scope = torch.NewDisposeScope();
        var scores = TripletScores();
        var all = torch.cat(scores, 0);
        var masked = InitialBudget - budget;
        // PEFT masks every triplet whose score is ≤ the k-th smallest (ties may mask a few more).
        var threshold = masked <= 0 ? double.NegativeInfinity : all.sort().Values.narrow(0, masked - 1, 1).ToDouble();
        var result = new bool[layers.Count][];
        using var _ = torch.no_grad();
        for (var i = 0; i < layers.Count; i++)
        {
            var keep = scores[i].gt(threshold);
            layers[i].E.mul_(keep.to(layers[i].E.dtype).view(-1, 1));
            result[i] = keep.to(ScalarType.Float32).data<float>().Select(v => v > 0.5f).ToArray();
        }
        return result;
    }

    /// <summary>Zeroes E wherever a saved pattern says a triplet was pruned.</summary>
    public void MaskWithPattern(bool[][] pattern)
    {
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        for (var i = 0; i < layers.Count; i++)
        {
            var keep = torch.tensor(pattern[i].Select(k => k ? 1f : 0f).ToArray(), [pattern[i].Length, 1], device: layers[i].E.device);
            layers[i].E.mul_(keep.to(layers[i].E.dtype));
        }
    }

    public void ResetImportance()
    {
        foreach (var (avg, unc) in state.Values)
        {
            avg.Dispose();
            unc.Dispose();
        }
        state.Clear();
    }

    public void Dispose() => ResetImportance();
}
