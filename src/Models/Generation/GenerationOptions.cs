namespace LoRAHub.Models.Generation;

public sealed record GenerationOptions
{
    public int MaxNewTokens { get; init; } = 64;
    /// <summary>0 means greedy decoding.</summary>
    public double Temperature { get; init; }
    /// <summary>Keep only the k most likely tokens (0 or -1: off).</summary>
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

    /// <summary>
    /// Checks the sampling settings, the one rule for every caller (generate and eval on the command line, serve's
    /// requests): max new tokens from 1 to <paramref name="maxNewTokensLimit"/>, temperature from 0 to 2 (OpenAI's
    /// range), top-p in (0, 1], top-k 0 or -1 (off) or positive.
    /// </summary>
    /// <param name="names">How the caller's users spell each setting (<see cref="GenerationOptionNames.Cli"/>, serve's JSON fields).</param>
    /// <exception cref="InvalidGenerationOptionException">The first setting out of range, named as <paramref name="names"/> spells it.</exception>
    public void Validate(GenerationOptionNames? names = null, int maxNewTokensLimit = int.MaxValue)
    {
        names ??= GenerationOptionNames.Properties;
        if (MaxNewTokens < 1 || MaxNewTokens > maxNewTokensLimit)
            throw new InvalidGenerationOptionException(names.MaxNewTokens, maxNewTokensLimit == int.MaxValue
                ? $"{names.MaxNewTokens} must be at least 1, got {MaxNewTokens}"
                : $"{names.MaxNewTokens} must be between 1 and {maxNewTokensLimit}, got {MaxNewTokens}");
        if (!(Temperature is >= 0 and <= 2))
            throw new InvalidGenerationOptionException(names.Temperature, $"{names.Temperature} must be between 0 and 2 (0: greedy), got {Temperature}");
        if (!(TopP is > 0 and <= 1))
            throw new InvalidGenerationOptionException(names.TopP, $"{names.TopP} must be in (0, 1] (1: off), got {TopP}");
        if (TopK < -1)
            throw new InvalidGenerationOptionException(names.TopK, $"{names.TopK} must be 0 or -1 (off) or positive, got {TopK}");
    }
}

/// <summary>The names of <see cref="GenerationOptions"/>' settings in messages: as a command line or an API spells them.</summary>
public sealed record GenerationOptionNames(string MaxNewTokens, string Temperature, string TopK, string TopP)
{
    /// <summary>The C# property names (scripts).</summary>
    public static readonly GenerationOptionNames Properties = new(nameof(MaxNewTokens), nameof(Temperature), nameof(TopK), nameof(TopP));

    /// <summary>The options of <c>generate</c> and <c>eval</c>.</summary>
    public static readonly GenerationOptionNames Cli = new("--max-new-tokens", "--temperature", "--top-k", "--top-p");
}

/// <summary>A generation setting out of range; the message names it as the caller spells it (<see cref="Option"/>) and its range.</summary>
public sealed class InvalidGenerationOptionException(string option, string message) : ArgumentException(message)
{
    /// <summary>The setting at fault, as the caller spells it ("--top-p", "top_p").</summary>
    public string Option { get; } = option;
}
