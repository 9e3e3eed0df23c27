using LoRAHub.Tuners.Importance;

namespace LoRAHub.HeadLoRA.Tests;

/// <summary>
/// The kit's importance machinery (src/Tuners/Importance), shared by HeadLoRA and AdaLoRA, against hand computations.
/// AdaLoRA's suite checks the schedule's numbers and its masking through its RankAllocator.
/// </summary>
public sealed class ImportanceTests
{
    [Fact]
    public void Sensitivity_ema_smooths_the_sensitivity_and_its_uncertainty()
    {
        using var scope = NewDisposeScope();
        using var ema = new SensitivityEma(0.5, 0.5);
        var w = tensor(new[] { 2f, -1f }).requires_grad_();
        w.mul(tensor(new[] { 3f, 0f })).sum().backward();  // ∂L/∂w = [3, 0]: I = |w·g| = [6, 0]
        ema.Update([w]);
        // Ī = 0.5·6 = 3, Ū = 0.5·|6 − 3| = 1.5: score 4.5; the untouched entry scores 0.
        Assert.Equal([4.5f, 0f], ema.Score(w).data<float>().ToArray());
        w.grad!.copy_(tensor(new[] { 1f, 0f }));           // I = [2, 0]
        ema.Update([w]);
        // Ī = 0.5·3 + 0.5·2 = 2.5, Ū = 0.5·1.5 + 0.5·|2 − 2.5| = 1: score 2.5.
        Assert.Equal([2.5f, 0f], ema.Score(w).data<float>().ToArray());
        ema.Reset();
        Assert.Equal([0f, 0f], ema.Score(w).data<float>().ToArray());
    }

    [Fact]
    public void Component_scores_add_the_singular_value_and_the_mean_row_and_column_scores()
    {
        using var scope = NewDisposeScope();
        using var ema = new SensitivityEma(0.5, 0.5);
        var a = ones(2, 3).requires_grad_();
        var e = ones(2, 1).requires_grad_();
        var b = ones(4, 2).requires_grad_();
        foreach (var p in new[] { a, e, b }) p.grad = ones_like(p); // I = 1 everywhere: Ī = 0.5, Ū = 0.25, score 0.125
        ema.Update([a, e, b]);
        Assert.Equal([0.375f, 0.375f], ema.ComponentScores(a, e, b).data<float>().ToArray());
        Assert.Equal([0.25f, 0.25f], ema.ComponentScores(a, null, b).data<float>().ToArray());
    }

    [Fact]
    public void Budget_mask_keeps_the_highest_scores_across_groups()
    {
        using var scope = NewDisposeScope();
        var keep = BudgetMask.Keep([tensor(new[] { 0.1f, 0.9f, 0.5f }), tensor(new[] { 0.7f, 0.2f })], budget: 3);
        Assert.Equal([false, true, true], BudgetMask.ToArray(keep[0]));
        Assert.Equal([true, false], BudgetMask.ToArray(keep[1]));
        Assert.All(BudgetMask.Keep([tensor(new[] { 0.1f, 0.2f })], budget: 5).Select(BudgetMask.ToArray), k => Assert.All(k, Assert.True));
    }

    [Fact]
    public void Budget_schedule_is_cubic_between_tinit_and_the_final_phase()
    {
        var schedule = new BudgetSchedule(Initial: 40, Target: 20, Tinit: 0, Tfinal: 2, TotalStep: 12, DeltaT: 5);
        Assert.Equal((40, false), schedule.At(0));
        Assert.Equal((22, true), schedule.At(5));   // 1 − 5/10 = 0.5 → 20·0.125 + 20 = 22.5 → 22; 5 % deltaT = 0
        Assert.Equal((21, false), schedule.At(6));  // 0.4 → 20·0.064 + 20 = 21.28
        Assert.Equal((20, true), schedule.At(11));
        Assert.Equal(10, schedule.FinalStep);
    }
}
