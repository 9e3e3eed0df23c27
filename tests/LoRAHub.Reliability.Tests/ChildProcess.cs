using System.Diagnostics;

namespace LoRAHub.Reliability.Tests;

/// <summary>Runs this assembly's child mode, or the real host, as a separate process with a timeout.</summary>
internal static class ChildProcess
{
    public sealed record Result(int ExitCode, IReadOnlyList<string> Stdout, string Stderr, bool TimedOut)
    {
        /// <summary>Killed by SIGKILL (.NET reports a signalled child as 128 + signal).</summary>
        public bool Killed => ExitCode == 137;
        public string Text => string.Join("\n", Stdout) + "\n" + Stderr;
    }

    public static string Dotnet => Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } p && File.Exists(p) ? p : "dotnet";

    /// <param name="onLine">
    /// As for <see cref="Run"/>; given one, the child runs with <see cref="TrainChild.WaitAfterLoss"/> and the parent
    /// acknowledges each loss line after onLine has seen it, so the child is never more than one step ahead of the reader.
    /// </param>
    public static Result Train(string dir, long steps, IEnumerable<string> flags, IReadOnlyDictionary<string, string>? env = null,
        Func<string, Process, bool>? onLine = null, int timeoutSeconds = 120) =>
        Run(Dotnet, [typeof(TrainChild).Assembly.Location, TrainChild.Verb, dir, steps.ToString(), .. flags, .. onLine != null ? [TrainChild.WaitAfterLoss] : Array.Empty<string>()],
            env, onLine, timeoutSeconds, acknowledged: onLine != null ? TrainChild.IsLossLine : null);

    /// <param name="onLine">Sees each stdout line; returning true kills the process there (SIGKILL).</param>
    /// <param name="acknowledged">
    /// The stdout lines after which the child blocks until it reads a line from its stdin. The parent writes that line once
    /// onLine has seen the child's line (also before a kill, which then lands while the child goes on, at the latest
    /// at its next such line): a child that prints faster than the parent reads cannot run past the kill.
    /// </param>
    public static Result Run(string file, IEnumerable<string> args, IReadOnlyDictionary<string, string>? env = null,
        Func<string, Process, bool>? onLine = null, int timeoutSeconds = 120, string? directory = null, Func<string, bool>? acknowledged = null)
    {
        var info = new ProcessStartInfo(file)
        {
            RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
            RedirectStandardInput = acknowledged != null,
            WorkingDirectory = directory ?? Environment.CurrentDirectory,
        };
        foreach (var a in args) info.ArgumentList.Add(a);
        // Faults are planned per child: never inherited from the test process's environment.
        info.Environment.Remove("LORAHUB_FAULT_AT");
        info.Environment.Remove("LORAHUB_FAULT_TRACE");
        info.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        info.Environment["DOTNET_TieredPGO"] = "0";
        // As scripts/gpu/run.sh runs the suites: the GPU machine's runtime may be newer than the one built against.
        if (!info.Environment.ContainsKey("DOTNET_ROLL_FORWARD")) info.Environment["DOTNET_ROLL_FORWARD"] = "Major";
        foreach (var (k, v) in env ?? new Dictionary<string, string>()) info.Environment[k] = v;
        using var process = Process.Start(info)!;
        var stdout = new List<string>();
        var stderr = process.StandardError.ReadToEndAsync();
        var reader = Task.Run(() =>
        {
            while (process.StandardOutput.ReadLine() is { } line)
            {
                lock (stdout) stdout.Add(line);
                var kill = onLine != null && onLine(line, process);
                if (acknowledged != null && acknowledged(line))
                {
                    try
                    {
                        process.StandardInput.WriteLine();
                        process.StandardInput.Flush();
                    }
                    catch (IOException) { } // the child is gone already (killed, or exited on its own)
                }
                if (kill)
                {
                    try { process.Kill(); } catch (InvalidOperationException) { }
                }
            }
        });
        var exited = process.WaitForExit(timeoutSeconds * 1000);
        if (!exited)
        {
            process.Kill(entireProcessTree: true);
            process.WaitForExit();
        }
        reader.Wait(10_000);
        lock (stdout) return new Result(process.ExitCode, stdout.ToList(), stderr.Wait(10_000) ? stderr.Result : "", !exited);
    }
}
