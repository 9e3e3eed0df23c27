namespace LoRAHub.Safetensors;

/// <summary>
/// A malformed safetensors file, shard index or checkpoint folder. The message names the file, the tensor where one is
/// involved, the exact problem and what to do about it.
/// </summary>
public sealed class SafetensorsFormatException : Exception
{
    public SafetensorsFormatException(string message) : base(message)
    {
    }

    public SafetensorsFormatException(string message, Exception? innerException) : base(message, innerException)
    {
    }

    /// <summary>Builds the message "{filePath}: tensor '{tensorName}': {problem}" (the tensor part only when given).</summary>
    public SafetensorsFormatException(string filePath, string? tensorName, string problem, Exception? innerException = null)
        : base(Compose(filePath, tensorName, problem), innerException)
    {
        FilePath = filePath;
        TensorName = tensorName;
    }

    /// <summary>The file at fault, when known.</summary>
    public string? FilePath { get; }

    /// <summary>The tensor at fault, when the problem concerns one.</summary>
    public string? TensorName { get; }

    private static string Compose(string filePath, string? tensorName, string problem) =>
        tensorName is null ? $"{filePath}: {problem}" : $"{filePath}: tensor '{tensorName}': {problem}";
}
