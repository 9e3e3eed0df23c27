namespace LoRAHub.AdaLoRA.Tests;

/// <summary>
/// AdaLoRA keeps training state outside its tensors and the optimizer (the importance averages while the budget falls,
/// the rank pattern fixed at total_step − tfinal): a run stopped and resumed in either phase gives the uninterrupted losses.
/// </summary>
public sealed class AdaLoraResumeTests : IDisposable
{
    private readonly string dir = Path.Combine(Path.GetTempPath(), "lorahub-adalora-resume-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
    }

    // TotalStep 12, Tinit 2, Tfinal 3, DeltaT 2: the budget falls over steps 2–8, is fixed at 9 and held after.
    [Theory]
    [InlineData(5)]   // while the budget falls: the importance averages carry over
    [InlineData(10)]  // after the final budget: the rank pattern carries over
    public void A_resumed_run_gives_the_uninterrupted_losses(long stopAt) =>
        ResumeRuns.AssertResumesExactly(dir, model => new AdaLoraMethod().Attach(model, new AdaLoraOptions
        {
            InitR = 6, TargetR = 2, TotalStep = (int)ResumeRuns.Steps, Tinit = 2, Tfinal = 3, DeltaT = 2, LoraAlpha = 8,
            TargetModules = new[] { "q_proj", "v_proj" }.ToList(),
        }), stopAt);
}
