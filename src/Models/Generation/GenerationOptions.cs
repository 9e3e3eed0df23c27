namespace LoRAHub.Models.Generation;

public sealed record GenerationOptions
{
    public int MaxNewTokens { get; init; } = 64;
    /// <summary>0 means greedy decoding.</summary>
    public double Temperature { get; init; }
    /// <summary>Keep only the k most likely tokens (0: off).</summary>
    public int TopK { get; init; }
    /// <summary>Nucleus sampling: smallest set with this much probability (1: off).</summary>
    public double TopP { get; init; } = 1.0;
    /// <summary>A sequence stops after emitting one of these (the stop token is kept in the output).</summary>
    public IReadOnlyList<int> StopTokenIds { get; init; } = [];
    public int Seed { get; init; }
    /// <summary>Id used for left padding (its value does not matter: padded positions are masked).</summary>
    public int PadTokenId { get; init; }
    /// <summary>Use the KV cache (false recomputes the whole sequence each step; for checking the cache).</summary>
    public bool UseCache { get; init; } = true;
}
