using LoRAHub.Tuners.Importance;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.HeadLoRA;

/// <summary>
/// The adaptive mode's budget, at head granularity, on the kit's importance machinery shared with AdaLoRA: every head
/// of every split projection (and every plain layer) starts with init_r rank-1 components; a component (A row, E value,
/// B column of its head) scores s(E_i) + mean s(A_i,·) + mean s(B_·,i) from <see cref="SensitivityEma"/>; the number
/// kept falls on AdaLoRA's cubic <see cref="BudgetSchedule"/> to target_r per head on average, and the lowest-scoring
/// components across all heads and matrices get E = 0 (<see cref="BudgetMask"/>). So rank moves to the heads that matter.
/// </summary>
public sealed class HeadRankAllocator : IDisposable
{
    private readonly IReadOnlyList<HeadLoraLinear> layers;
    private readonly SensitivityEma importance;

    public HeadRankAllocator(IReadOnlyList<HeadLoraLinear> layers, HeadLoraOptions options)
    {
        this.layers = layers;
        importance = new SensitivityEma(options.Beta1, options.Beta2);
        var units = layers.Sum(l => l.Layout.Heads);
        Schedule = new BudgetSchedule(layers.Sum(l => l.Layout.Rank), options.TargetR * units, options.Tinit, options.Tfinal,
            options.TotalStep!.Value, options.DeltaT);
    }

    public BudgetSchedule Schedule { get; }

    /// <summary>The smoothed sensitivities (saved with checkpoints: the adapter's training state).</summary>
    public SensitivityEma Importance => importance;

    /// <summary>Smooths the sensitivities from the current gradients (after backward).</summary>
    public void UpdateImportance() => importance.Update(layers.SelectMany(l => new[] { l.A, l.E!, l.B }));

    /// <summary>Score of every packed component, per layer.</summary>
    public Tensor[] ComponentScores() => layers.Select(l => importance.ComponentScores(l.A, l.E, l.B)).ToArray();

    /// <summary>Keeps the <paramref name="budget"/> highest-scoring components over all layers and heads; the others get E = 0.</summary>
    public void MaskToBudget(int budget)
    {
        using var scope = torch.NewDisposeScope();
        var keep = BudgetMask.Keep(ComponentScores(), budget);
        for (var i = 0; i < layers.Count; i++) layers[i].Keep = BudgetMask.ToArray(keep[i]);
        ApplyMasks();
    }

    /// <summary>Zeroes E of every masked component (after each optimizer step once the pattern is fixed).</summary>
    public void ApplyMasks()
    {
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        foreach (var l in layers)
            if (l.Keep is { } keep)
                l.E!.mul_(torch.tensor(keep.Select(k => k ? 1f : 0f).ToArray(), [keep.Length, 1], device: l.E.device).to(l.E.dtype));
    }

    public void ResetImportance() => importance.Reset();

    public void Dispose() => importance.Dispose();
}
