using System.Diagnostics;
using LoRAHub.Distributed.Launch;

namespace LoRAHub.Distributed.Tests;

/// <summary>Starts this test assembly as N ranks under the launcher (mpi backend: MPICH's mpiexec).</summary>
internal static class Ranks
{
    private static int port = 29600 + Environment.ProcessId % 1000;

    public static (int exitCode, string output, string error, TimeSpan elapsed) Run(int ranks, params string[] args) => Run(ranks, 30, args);

    public static (int exitCode, string output, string error, TimeSpan elapsed) Run(int ranks, double timeoutSeconds, params string[] args) =>
        Run(ranks, timeoutSeconds, new Dictionary<string, string>(), args);

    /// <summary>With extra environment variables for the ranks (e.g. LORAHUB_DDP_OVERLAP).</summary>
    public static (int exitCode, string output, string error, TimeSpan elapsed) Run(int ranks, double timeoutSeconds, Dictionary<string, string> environment,
        params string[] args)
    {
        var dll = typeof(Worker).Assembly.Location;
        var dotnet = Environment.ProcessPath is { } p && Path.GetFileNameWithoutExtension(p) == "dotnet" ? p : "dotnet";
        var output = new StringWriter();
        var error = new StringWriter();
        var options = new LaunchOptions { NprocPerNode = ranks, Backend = "mpi", MasterPort = Interlocked.Increment(ref port), KillGrace = TimeSpan.FromSeconds(3) };
        var clock = Stopwatch.StartNew();
        var code = RankLauncher.Run(options, dotnet, [dll, .. args], error,
            new Dictionary<string, string>(environment) { ["LORAHUB_DIST_TIMEOUT"] = timeoutSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture) }, output);
        return (code, output.ToString(), error.ToString(), clock.Elapsed);
    }

    /// <summary>Skips (by returning false) where MPICH is not installed; CI installs it through setup.sh.</summary>
    public static bool MpiAvailable() => LoRAHub.Distributed.Launch.Mpiexec.Find() is not null;
}
