namespace LoRAHub.Training;

/// <summary>
/// The stop request that <see cref="Trainer.Train"/> follows when its caller passes no token: `loraHub run` sets it to
/// the script's Ctrl+C token, so every script stops gracefully (checkpoint, then "stopped at step N") without passing one.
/// Async-local: it holds for one script's run and the tasks that run starts, not for other code in the process.
/// </summary>
public static class TrainingCancellation
{
    private static readonly AsyncLocal<CancellationToken> ambient = new();

    /// <summary>The token in effect here; <see cref="CancellationToken.None"/> when no host set one.</summary>
    public static CancellationToken Current => ambient.Value;

    /// <summary>Makes <paramref name="token"/> the default of Train calls in this flow until the scope is disposed.</summary>
    public static IDisposable Use(CancellationToken token)
    {
        var scope = new Scope(ambient.Value);
        ambient.Value = token;
        return scope;
    }

    private sealed class Scope(CancellationToken previous) : IDisposable
    {
        public void Dispose() => ambient.Value = previous;
    }
}
