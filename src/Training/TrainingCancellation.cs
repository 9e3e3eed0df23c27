namespace LoRAHub.Training;

/// <summary>
/// The stop request that <see cref="Trainer.Train"/> follows when its caller passes no token: `loraHub run` sets it to
/// the script's Ctrl+C token, so every script stops gracefully (checkpoint, then "stopped at step N") without passing one.
/// Async-local: it holds for one script's run and the tasks that run starts, not for other code in the process.
/// Ctrl+C is graceful only while something follows the token (<see cref="Following"/>: a Train call, or a loop of the
/// script's own inside <see cref="Follow"/>); otherwise it ends the process at once, as in any program.
/// </summary>
public static class TrainingCancellation
{
    private static readonly AsyncLocal<CancellationToken> ambient = new();
    private static int followers;

    /// <summary>The token in effect here; <see cref="CancellationToken.None"/> when no host set one.</summary>
    public static CancellationToken Current => ambient.Value;

    /// <summary>Whether anything in the process follows a host's token now (a Train call, a <see cref="Follow"/> scope).</summary>
    public static bool Following => Volatile.Read(ref followers) > 0;

    /// <summary>Makes <paramref name="token"/> the default of Train calls in this flow until the scope is disposed.</summary>
    public static IDisposable Use(CancellationToken token)
    {
        var scope = new Scope(ambient.Value);
        ambient.Value = token;
        return scope;
    }

    /// <summary>
    /// Until disposed, Ctrl+C in the host cancels <see cref="Current"/> instead of ending the process: for a long loop of
    /// a script's own that checks the token and stops cleanly. Train calls do this themselves.
    /// </summary>
    public static IDisposable Follow()
    {
        Interlocked.Increment(ref followers);
        return new Follower();
    }

    private sealed class Scope(CancellationToken previous) : IDisposable
    {
        public void Dispose() => ambient.Value = previous;
    }

    private sealed class Follower : IDisposable
    {
        private int disposed;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref disposed, 1) == 0) Interlocked.Decrement(ref followers);
        }
    }
}
