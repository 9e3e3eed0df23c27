namespace LoRAHub.Distributed;

/// <summary>
/// A collective failed, timed out, or a peer went away. <see cref="Rank"/> names the rank that failed or fell silent
/// when it is known.
/// </summary>
public sealed class DistributedException(string message, int? rank = null, Exception? inner = null) : Exception(message, inner)
{
    public int? Rank { get; } = rank;
}
