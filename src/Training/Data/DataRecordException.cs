namespace LoRAHub.Training.Data;

/// <summary>A malformed data record, located by file and line.</summary>
public sealed class DataRecordException(string file, int line, string reason)
    : Exception($"{file}:{line}: {reason}")
{
    public string File { get; } = file;
    public int Line { get; } = line;
    public string Reason { get; } = reason;
}

public enum MalformedRecordPolicy
{
    /// <summary>Stop with an error naming the file, line and reason.</summary>
    Fail,
    /// <summary>Skip the record, count it, and report the count (and the first few reasons).</summary>
    Skip,
}
