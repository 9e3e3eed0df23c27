namespace LoRAHub.Models.Llama;

/// <summary>
/// When <see cref="LlamaMLP"/> runs over a long input in token chunks (<see cref="LoRAHub.TorchExtensions.torchx.utils.sequence_chunked"/>),
/// so that its tokens × intermediate tensors (gate, up, their product and, in backward, their gradients) exist for one
/// chunk at a time instead of whole. With grad on it costs one more MLP forward (backward recomputes each chunk), so by
/// default it is taken only where one such tensor would reach <see cref="AutoThresholdBytes"/> (1 GiB: llama-7b from about
/// 48,800 tokens in a batch, llama-3.2-1b from 65,536), where attention's quadratic cost dwarfs that forward and the
/// memory decides whether the step fits at all. Env <c>LORAHUB_MLP_CHUNK</c>: <c>0</c>/<c>off</c> never, <c>1</c>/<c>on</c>
/// always (whenever the input has more tokens than one chunk), a number of tokens: always, chunks of that size; unset or
/// <c>auto</c>: by size.
/// </summary>
public static class ChunkedMlp
{
    static ChunkedMlp()
    {
        var value = Environment.GetEnvironmentVariable("LORAHUB_MLP_CHUNK")?.Trim().ToLowerInvariant();
        switch (value)
        {
            case null or "" or "auto":
                break;
            case "0" or "off" or "false":
                Enabled = false;
                break;
            case "1" or "on" or "true":
                Enabled = true;
                break;
            default:
                if (!long.TryParse(value, out var tokens) || tokens <= 0)
                    throw new ArgumentException($"LORAHUB_MLP_CHUNK='{value}': expected 0/off, 1/on, auto or a number of tokens per chunk");
                Enabled = true;
                ChunkTokens = tokens;
                break;
        }
    }

    /// <summary>True: always chunk; false: never; null (the default): when one tokens × intermediate tensor reaches <see cref="AutoThresholdBytes"/>.</summary>
    public static bool? Enabled { get; set; }

    /// <summary>The size of one tokens × intermediate tensor from which the automatic choice chunks (1 GiB).</summary>
    public static long AutoThresholdBytes { get; set; } = 1L << 30;

    /// <summary>
    /// What one chunk's tokens × intermediate tensor may take (128 MiB: llama-7b 5,120 tokens a chunk, llama-3.2-1b 8,192).
    /// Backward holds about six such tensors of the chunk at once; small against what a long sequence's attention holds,
    /// and the GEMMs over a few thousand rows still run at full speed.
    /// </summary>
    public static long ChunkBytes { get; set; } = 128L << 20;

    /// <summary>Tokens per chunk, overriding <see cref="ChunkBytes"/> (null: from the bytes).</summary>
    public static long? ChunkTokens { get; set; }

    /// <summary>
    /// Tokens per chunk for an MLP input of <paramref name="tokens"/> tokens (all leading dimensions) with
    /// <paramref name="intermediate"/> features in between, elements of <paramref name="elementSize"/> bytes; null: run whole.
    /// </summary>
    public static long? ChunkSize(long tokens, long intermediate, long elementSize)
    {
        if (Enabled == false || tokens <= 1) return null;
        var perToken = Math.Max(1, intermediate * elementSize);
        if (Enabled is null && tokens * perToken < AutoThresholdBytes) return null;
        // From the bytes: a multiple of 1024 tokens (whole GEMM tiles), at least 1024.
        var chunk = ChunkTokens ?? Math.Max(1024, ChunkBytes / perToken / 1024 * 1024);
        return chunk < tokens ? chunk : null;
    }
}
