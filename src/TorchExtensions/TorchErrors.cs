using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// Turns the <see cref="ExternalException"/> TorchSharp raises for every libtorch error into a typed
/// <see cref="TorchException"/> (out-of-memory becomes <see cref="OutOfMemoryTorchException"/>), keeping libtorch's message.
/// </summary>
public static class TorchErrors
{
    // One translation per exception: the kept backward failure is taken once, so a second Translate of the same
    // exception (an exception filter, then the catch) must give the same answer rather than lose the cause.
    private static readonly ConditionalWeakTable<Exception, Exception> translated = new();

    /// <summary>The typed exception for <paramref name="e"/>; other exceptions (and ours) come back unchanged.</summary>
    public static Exception Translate(Exception e)
    {
        if (e is TorchException || e is not ExternalException) return e;
        lock (translated)
        {
            if (translated.TryGetValue(e, out var known)) return known;
            var result = TranslateOnce(e);
            translated.Add(e, result);
            return result;
        }
    }

    private static Exception TranslateOnce(Exception e)
    {
        var message = StripBacktrace(e.Message);
        // A C# backward that failed returned a meta-device gradient to stop libtorch's engine (CustomFunction, checkpoint).
        if (message.Contains("meta", StringComparison.Ordinal) && CheckpointFailures.Take() is { } inner)
        {
            var cause = $"{inner.Message} (libtorch stopped backward: {message})";
            return IsOutOfMemory(inner) ? new OutOfMemoryTorchException(cause, inner) : new TorchException(TorchErrorKind.Generic, cause, inner);
        }
        return new Classified(message) switch
        {
            { Kind: TorchErrorKind.OutOfMemory } => new OutOfMemoryTorchException(message, e),
            var c => new TorchException(c.Kind, message, e),
        };
    }

    // An out-of-memory error inside our own backward (a kernel's workspace, a recomputed checkpoint) gets the same advice.
    private static bool IsOutOfMemory(Exception e) => e switch
    {
        OutOfMemoryTorchException => true,
        TorchException t => t.Kind == TorchErrorKind.OutOfMemory,
        ExternalException x => Classify(x.Message) == TorchErrorKind.OutOfMemory,
        _ => e.InnerException is { } i && IsOutOfMemory(i),
    };

    /// <summary>The kind of a libtorch error from its message.</summary>
    public static TorchErrorKind Classify(string message) => new Classified(message).Kind;

    private readonly struct Classified(string message)
    {
        public TorchErrorKind Kind { get; } =
            message.Contains("out of memory", StringComparison.OrdinalIgnoreCase) || message.Contains("OutOfMemoryError") ||
            message.Contains("CUBLAS_STATUS_ALLOC_FAILED") || message.Contains("DefaultCPUAllocator: can't allocate memory")
                ? TorchErrorKind.OutOfMemory
            : message.Contains("IndexError") || message.Contains("out of range") || message.Contains("out of bounds") ? TorchErrorKind.Index
            : message.Contains("NotImplementedError") || message.Contains("not implemented for") ? TorchErrorKind.NotImplemented
            : message.Contains("TypeError") || message.Contains("expected scalar type") ? TorchErrorKind.Type
            : message.Contains("ValueError") ? TorchErrorKind.Value
            : TorchErrorKind.Generic;
    }

    // libtorch appends a C++ backtrace ("Exception raised from ... frame #0: ...") that means nothing to a .NET user.
    private static string StripBacktrace(string message)
    {
        var cut = message.IndexOf("\nException raised from ", StringComparison.Ordinal);
        if (cut < 0) cut = message.IndexOf("Exception raised from ", StringComparison.Ordinal);
        return (cut > 0 ? message[..cut] : message).TrimEnd();
    }
}
