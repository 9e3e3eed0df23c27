namespace LoRAHub.Training;

/// <summary>
/// The summary of a run: where files went and how fast it was; <c>Stopped</c>: it ended at its cancellation token before
/// MaxSteps, with a checkpoint (<c>LastCheckpoint</c>).
/// </summary>
public sealed record TrainResult(
    long Steps,
    IReadOnlyList<double> Losses,
    double? FinalEvalLoss,
    TimeSpan Elapsed,
    double TokensPerSecond,
    long? PeakGpuMemoryBytes,
    string OutputDir,
    string MetricsFile,
    string PlotFile,
    string? LastCheckpoint,
    int SkippedSteps,
    bool Stopped = false)
{
    public string Summary() =>
        $"{(Stopped ? "stopped after" : "trained")} {Steps} steps in {Elapsed.TotalSeconds:0.0} s ({TokensPerSecond:N0} tokens/s" +
        (PeakGpuMemoryBytes is long p ? $", peak GPU memory {p / (double)(1L << 30):0.00} GiB" : "") + ")" +
        (Losses.Count > 0 ? $"; loss {Losses[0]:0.000} → {Losses[^1]:0.000}" : "") +
        (FinalEvalLoss is double e ? $"; eval loss {e:0.000} (perplexity {Math.Exp(e):0.00})" : "") +
        (SkippedSteps > 0 ? $"; {SkippedSteps} steps skipped for non-finite values" : "") +
        $"\n  metrics: {MetricsFile}\n  plot: {PlotFile}" + (LastCheckpoint != null ? $"\n  checkpoint: {LastCheckpoint}" : "");
}
