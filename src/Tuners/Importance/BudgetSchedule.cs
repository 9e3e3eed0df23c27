namespace LoRAHub.Tuners.Importance;

/// <summary>
/// AdaLoRA's budget schedule (PEFT's RankAllocator.budget_schedule): the number of rank-1 components kept stays at
/// <see cref="Initial"/> for the first <see cref="Tinit"/> steps, falls cubically to <see cref="Target"/> by step
/// total − tfinal, and stays there; masking happens every <see cref="DeltaT"/> steps while it falls, every step after.
/// </summary>
public sealed record BudgetSchedule(int Initial, int Target, int Tinit, int Tfinal, int TotalStep, int DeltaT)
{
    /// <summary>
    /// Checks the options of an importance-budgeted method (AdaLoRA's names: total_step, init_r, target_r, tinit, tfinal,
    /// deltaT, beta1, beta2); an error names the option and the method.
    /// </summary>
    public static void Validate(string method, long? totalStep, int initR, int targetR, int tinit, int tfinal, int deltaT, double beta1, double beta2)
    {
        if (totalStep is not { } total || total <= 0)
            throw TargetResolver.Bad(method, "total_step", $"must be the number of training steps (the budget schedule needs it), got {totalStep?.ToString() ?? "null"}");
        if (initR <= 0) throw TargetResolver.Bad(method, "init_r", $"must be positive, got {initR}");
        if (targetR <= 0 || targetR > initR) throw TargetResolver.Bad(method, "target_r", $"must be between 1 and init_r ({initR}), got {targetR}");
        if (tinit < 0 || tfinal < 0 || tinit >= total - tfinal)
            throw TargetResolver.Bad(method, "tinit", $"and tfinal must leave a budgeting phase: need tinit ({tinit}) < total_step ({total}) − tfinal ({tfinal})");
        if (deltaT <= 0) throw TargetResolver.Bad(method, "deltaT", $"must be positive, got {deltaT}");
        if (!(beta1 > 0 && beta1 < 1)) throw TargetResolver.Bad(method, "beta1", $"must be in (0, 1), got {beta1}");
        if (!(beta2 > 0 && beta2 < 1)) throw TargetResolver.Bad(method, "beta2", $"must be in (0, 1), got {beta2}");
    }

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
