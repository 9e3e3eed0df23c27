using System.Text.Json;

namespace LoRAHub.Training.Reporting;

/// <summary>One metrics record per logged step, appended to metrics.jsonl (flushed each line, so it survives a crash).</summary>
public sealed record StepMetrics(long Step, double Loss, double LearningRate, double GradNorm, double TokensPerSecond, long Tokens,
    double ElapsedSeconds, double? EvalLoss = null, double? EvalPerplexity = null, long? GpuMemoryBytes = null, bool Skipped = false);

public sealed class MetricsLog : IDisposable
{
    private static readonly JsonSerializerOptions Json = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        // A skipped step's loss is NaN or Infinity; keep it visible in the log.
        NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals,
    };
    private readonly StreamWriter writer;

    /// <summary>
    /// A new log, or with <paramref name="resumedStep"/> the log of a resumed run: the records up to that step are kept
    /// (and in <see cref="Records"/>, so the plot shows the whole curve); later ones, written before a crash, are dropped
    /// because the run computes those steps again.
    /// </summary>
    public MetricsLog(string path, long? resumedStep)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(path))!);
        Path_ = path;
        if (resumedStep is { } step && File.Exists(path)) Records.AddRange(KeepUpTo(path, step));
        writer = new StreamWriter(path, append: resumedStep != null) { AutoFlush = true };
    }

    // Rewrites the file with the records of steps <= step (atomically: a crash here keeps the old file).
    private static List<StepMetrics> KeepUpTo(string path, long step)
    {
        var kept = new List<StepMetrics>();
        var lines = new List<string>();
        foreach (var line in File.ReadLines(path))
        {
            StepMetrics? m;
            try { m = JsonSerializer.Deserialize<StepMetrics>(line, Json); }
            catch (JsonException) { continue; }   // a line torn by the crash
            if (m == null || m.Step > step) continue;
            kept.Add(m);
            lines.Add(line);
        }
        var temp = path + ".tmp";
        File.WriteAllLines(temp, lines);
        File.Move(temp, path, overwrite: true);
        return kept;
    }

    public string Path_ { get; }
    public List<StepMetrics> Records { get; } = [];

    public void Write(StepMetrics m)
    {
        Records.Add(m);
        writer.WriteLine(JsonSerializer.Serialize(m, Json));
    }

    public void Dispose() => writer.Dispose();
}
