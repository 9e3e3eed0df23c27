namespace LoRAHub.Host.Serving;

/// <summary>serve's settings (the command's options).</summary>
public sealed record ServeOptions
{
    /// <summary>Loopback unless told otherwise: the server runs code paths on any request it gets.</summary>
    public string Host { get; init; } = "127.0.0.1";

    /// <summary>0 picks a free port (tests); the bound address is in <see cref="OpenAiServer.Address"/>.</summary>
    public int Port { get; init; } = 8000;

    /// <summary>The id the base model is served under (default: its folder's name).</summary>
    public string? BaseName { get; init; }

    public int MaxBatchSize { get; init; } = 16;

    /// <summary>Adapters kept in memory; more may be registered, the least recently used are evicted and reloaded on demand.</summary>
    public int MaxLoadedAdapters { get; init; } = 8;

    /// <summary>How long the worker waits after a request for others to join its batch.</summary>
    public TimeSpan BatchWait { get; init; } = TimeSpan.FromMilliseconds(10);

    /// <summary>The address to bind: an IP address, or "localhost" (IPv4 loopback).</summary>
    /// <exception cref="ArgumentException"><see cref="Host"/> is neither.</exception>
    public System.Net.IPAddress ListenAddress() =>
        System.Net.IPAddress.TryParse(Host, out var address) ? address
        : Host == "localhost" ? System.Net.IPAddress.Loopback
        : throw new ArgumentException($"--host '{Host}' is not an IP address (use 127.0.0.1, ::1, or 0.0.0.0 to listen on every interface)");

    /// <summary>The largest max_tokens a request may ask for.</summary>
    public int MaxTokensLimit { get; init; } = 4096;

    /// <summary>
    /// The most tokens a request's prompt and completion may take together (vLLM's max_model_len); null: the model's
    /// positions (<see cref="Everyday.LoadedModel.ContextLength"/>). Above them a RoPE model extrapolates, which
    /// degrades the text; GPT-2 has no positions past its table.
    /// </summary>
    public int? ContextLength { get; init; }
}
