namespace LoRAHub.Host;

public static class ExitCodes
{
    public const int Ok = 0;

    /// <summary>The script failed to compile or threw.</summary>
    public const int ScriptError = 1;

    /// <summary>Bad command line: unknown command or option, missing script file, bad device.</summary>
    public const int UsageError = 2;

    /// <summary>Stopped by Ctrl+C (128 + SIGINT, as a shell reports a program SIGINT ended), after a checkpoint where it trained.</summary>
    public const int Interrupted = Distributed.Launch.RankLauncher.InterruptedExitCode;
}
