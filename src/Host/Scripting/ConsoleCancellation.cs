using LoRAHub.Training;

namespace LoRAHub.Host.Scripting;

/// <summary>
/// Ctrl+C (SIGINT) while a script runs: while the script trains (<see cref="TrainingCancellation.Following"/>), the first
/// press cancels <see cref="Token"/>, which the trainer follows by saving a checkpoint and stopping after the current
/// step, and says so; a second press, or any press while nothing follows the token, ends the process as Ctrl+C always
/// did. The handler is removed on dispose, when the script has ended.
/// </summary>
public sealed class ConsoleCancellation : IDisposable
{
    public const string StoppingMessage = "stopping after this step (Ctrl+C again to quit now)";

    private readonly CancellationTokenSource source = new();
    private readonly TextWriter error;
    private readonly ConsoleCancelEventHandler handler;
    private int presses;

    public ConsoleCancellation(TextWriter error)
    {
        this.error = error;
        handler = (_, e) => e.Cancel = Press();
        Console.CancelKeyPress += handler;
    }

    public CancellationToken Token => source.Token;

    /// <summary>One Ctrl+C; true when the process should live on (the first press during training), false to let it end.</summary>
    public bool Press()
    {
        if (!TrainingCancellation.Following || Interlocked.Increment(ref presses) > 1) return false;
        error.WriteLine(StoppingMessage);
        source.Cancel();
        return true;
    }

    // The source is not disposed: it holds no timer, and a press racing with Dispose could otherwise cancel a disposed one.
    public void Dispose() => Console.CancelKeyPress -= handler;
}
