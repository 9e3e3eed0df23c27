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

    public MetricsLog(string path, bool append)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(path))!);
        Path_ = path;
        writer = new StreamWriter(path, append) { AutoFlush = true };
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
