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

    public static Result Train(string dir, long steps, IEnumerable<string> flags, IReadOnlyDictionary<string, string>? env = null,
        Func<string, Process, bool>? onLine = null, int timeoutSeconds = 120) =>
        Run(Dotnet, [typeof(TrainChild).Assembly.Location, TrainChild.Verb, dir, steps.ToString(), .. flags], env, onLine, timeoutSeconds);

    /// <param name="onLine">Sees each stdout line; returning true kills the process there (SIGKILL).</param>
    public static Result Run(string file, IEnumerable<string> args, IReadOnlyDictionary<string, string>? env = null,
        Func<string, Process, bool>? onLine = null, int timeoutSeconds = 120, string? directory = null)
    {
        var info = new ProcessStartInfo(file)
        {
            RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
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
                if (onLine != null && onLine(line, process))
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
