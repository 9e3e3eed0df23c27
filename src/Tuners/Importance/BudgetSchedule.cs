namespace LoRAHub.Tuners.Importance;

/// <summary>
/// AdaLoRA's budget schedule (PEFT's RankAllocator.budget_schedule): the number of rank-1 components kept stays at
/// <see cref="Initial"/> for the first <see cref="Tinit"/> steps, falls cubically to <see cref="Target"/> by step
/// total − tfinal, and stays there; masking happens every <see cref="DeltaT"/> steps while it falls, every step after.
/// </summary>
public sealed record BudgetSchedule(int Initial, int Target, int Tinit, int Tfinal, int TotalStep, int DeltaT)
{
    /// <summary>The step at which the final budget is fixed (total_step − tfinal).</summary>
    public int FinalStep => TotalStep - Tfinal;

    /// <summary>(budget, whether to mask at this step).</summary>
    public (int budget, bool mask) At(long step)
    {
        if (step <= Tinit) return (Initial, false);
        if (step > TotalStep - Tfinal) return (Target, true);
        var remaining = 1 - (double)(step - Tinit) / (TotalStep - Tfinal - Tinit);
        var budget = (int)((Initial - Target) * Math.Pow(remaining, 3) + Target);
        return (budget, step % DeltaT == 0);
    }
}
