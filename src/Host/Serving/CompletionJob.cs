using System.Threading.Channels;
using LoRAHub.Host.Everyday;
using LoRAHub.Models.Generation;

namespace LoRAHub.Host.Serving;

/// <summary>
/// One request's row in a batch: its prompt, options, adapter and stop strings; text deltas flow to the HTTP handler
/// through <see cref="Deltas"/> as the worker decodes, and <see cref="Completion"/> ends with the whole answer. A
/// cancelled token (the client went away) finishes the row at the next step, or drops it while still queued.
/// </summary>
public sealed class CompletionJob(int[] prompt, GenerationOptions options, string adapter, IReadOnlyList<string> stops, CancellationToken cancellation)
{
    public int[] Prompt { get; } = prompt;
    public GenerationOptions Options { get; } = options;

    /// <summary>The served name: an adapter, or <see cref="LoRAHub.Abstractions.IAdapterSet.BaseName"/>.</summary>
    public string Adapter { get; } = adapter;

    public IReadOnlyList<string> Stops { get; } = stops;
    public CancellationToken Cancellation { get; } = cancellation;

    public Channel<string> Deltas { get; } = Channel.CreateUnbounded<string>(new UnboundedChannelOptions { SingleReader = true, SingleWriter = true });

    public TaskCompletionSource<CompletionResult> Completion { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

    internal TextStream? Stream { get; set; }
}

/// <param name="FinishReason">"stop", "length", or "cancelled" (the client left).</param>
public sealed record CompletionResult(string Text, int PromptTokens, int CompletionTokens, string FinishReason);
