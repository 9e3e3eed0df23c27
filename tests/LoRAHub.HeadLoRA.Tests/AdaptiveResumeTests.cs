namespace LoRAHub.HeadLoRA.Tests;

/// <summary>
/// Adaptive multi-head-aware LoRA keeps the importance averages and each layer's kept components outside its tensors:
/// a run stopped and resumed while the budget falls, or after it is fixed, gives the uninterrupted losses.
/// </summary>
public sealed class AdaptiveResumeTests : IDisposable
{
    private readonly string dir = Path.Combine(Path.GetTempPath(), "lorahub-headlora-resume-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
    }

    [Theory]
    [InlineData(5)]
    [InlineData(10)]
    public void A_resumed_adaptive_run_gives_the_uninterrupted_losses(long stopAt) =>
        ResumeRuns.AssertResumesExactly(dir, model => new HeadLoraMethod().Attach(model, new HeadLoraOptions
        {
            Adaptive = true, InitR = 4, TargetR = 2, TotalStep = (int)ResumeRuns.Steps, Tinit = 2, Tfinal = 3, DeltaT = 2, LoraAlpha = 4,
            HeadDim = 8, TargetModules = new[] { "q_proj", "v_proj" }.ToList(),
        }), stopAt);
}
