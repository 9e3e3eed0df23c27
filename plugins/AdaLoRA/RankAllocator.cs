using LoRAHub.Tuners.Importance;
using TorchSharp;
using Schedule = LoRAHub.Tuners.Importance.BudgetSchedule;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.AdaLoRA;

/// <summary>
/// AdaLoRA's budget (PEFT's RankAllocator) over the triplets (A row, E value, B column) of its layers, on the kit's
/// shared importance machinery: <see cref="SensitivityEma"/> smooths |w·∂L/∂w| and its uncertainty, a triplet scores
/// s(E_i) + mean s(A_i,·) + mean s(B_·,i); <see cref="Schedule"/> lowers the number of triplets kept
/// cubically from init to target; <see cref="BudgetMask"/> picks the lowest-scoring ones, whose E is zeroed.
/// </summary>
public sealed class RankAllocator : IDisposable
{
    private readonly IReadOnlyList<SvdLinear> layers;
    private readonly SensitivityEma importance;
    private readonly Schedule schedule;

    public RankAllocator(IReadOnlyList<SvdLinear> layers, AdaLoraOptions options)
    {
        this.layers = layers;
        importance = new SensitivityEma(options.Beta1, options.Beta2);
        schedule = new Schedule(layers.Sum(l => l.Rank), options.TargetR * layers.Count, options.Tinit, options.Tfinal,
            options.TotalStep!.Value, options.DeltaT);
    }

    /// <summary>The smoothed sensitivities (saved with checkpoints: the adapter's training state).</summary>
    public SensitivityEma Importance => importance;

    public int InitialBudget => schedule.Initial;

    public int TargetBudget => schedule.Target;

    /// <summary>(budget, whether to mask at this step), PEFT's budget_schedule.</summary>
    public (int budget, bool mask) BudgetSchedule(long step) => schedule.At(step);

    /// <summary>Updates the smoothed sensitivities from the current gradients (call after backward).</summary>
    public void UpdateImportance() => importance.Update(layers.SelectMany(l => new[] { l.A, l.E, l.B }));

    /// <summary>Score per triplet of each layer (length = rank).</summary>
    public Tensor[] TripletScores() => layers.Select(l => importance.ComponentScores(l.A, l.E, l.B)).ToArray();

    /// <summary>Keeps the `budget` highest-scoring triplets, zeroes E of the others; returns each layer's keep mask.</summary>
    public bool[][] MaskToBudget(int budget)
    {
        using var scope = torch.NewDisposeScope();
        var keep = BudgetMask.Keep(TripletScores(), budget);
        using var _ = torch.no_grad();
        for (var i = 0; i < layers.Count; i++) layers[i].E.mul_(keep[i].to(layers[i].E.dtype).view(-1, 1));
        return keep.Select(BudgetMask.ToArray).ToArray();
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

    public void ResetImportance() => importance.Reset();

    public void Dispose() => importance.Dispose();
}
