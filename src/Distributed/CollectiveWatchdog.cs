using System.Diagnostics;

namespace LoRAHub.Distributed;

/// <summary>
/// Times the collective in progress on a background thread: one that runs past the timeout calls
/// <paramref name="onTimeout"/> with its description and how long it has waited (a backend then aborts its communicator
/// so the blocked call returns, or ends the process where the engine cannot be interrupted). <paramref name="poll"/> runs on
/// every tick (NCCL's asynchronous-error check).
/// </summary>
internal sealed class CollectiveWatchdog : IDisposable
{
    private readonly TimeSpan timeout;
    private readonly Action<string, TimeSpan> onTimeout;
    private readonly Action? poll;
    private readonly Thread thread;
    private readonly CancellationTokenSource stop = new();
    private readonly object gate = new();
    private string? current;
    private long startedTicks;
    private bool fired;

    public CollectiveWatchdog(TimeSpan timeout, Action<string, TimeSpan> onTimeout, Action? poll = null, TimeSpan? tick = null)
    {
        this.timeout = timeout;
        this.onTimeout = onTimeout;
        this.poll = poll;
        Tick = tick ?? TimeSpan.FromMilliseconds(Math.Clamp(timeout.TotalMilliseconds / 20, 10, 500));
        thread = new Thread(Run) { IsBackground = true, Name = "lorahub-collective-watchdog" };
        thread.Start();
    }

    public TimeSpan Tick { get; }

    /// <summary>Marks a collective (or a wait on collectives) as in progress until the scope ends.</summary>
    public Scope Enter(string what)
    {
        lock (gate)
        {
            current = what;
            startedTicks = Stopwatch.GetTimestamp();
        }
        return new Scope(this);
    }

    public readonly struct Scope(CollectiveWatchdog owner) : IDisposable
    {
        public void Dispose()
        {
            lock (owner.gate) owner.current = null;
        }
    }

    private void Run()
    {
        while (!stop.Token.WaitHandle.WaitOne(Tick))
        {
            try { poll?.Invoke(); }
            catch (Exception) { /* the poll records its own failure */ }
            string? what;
            TimeSpan waited;
            lock (gate)
            {
                what = current;
                waited = Stopwatch.GetElapsedTime(startedTicks);
            }
            if (what == null || waited < timeout || fired) continue;
            fired = true;
            onTimeout(what, waited);
        }
    }

    public void Dispose()
    {
        stop.Cancel();
        if (Thread.CurrentThread != thread) thread.Join(TimeSpan.FromSeconds(5));
        stop.Dispose();
    }
}
