using System.Globalization;

namespace LoRAHub.Distributed.Launch;

/// <summary>
/// A rank's side of the launcher's bookkeeping: under <c>LORAHUB_LAUNCH_DIR</c> it writes <c>rank-R.pid</c> when it
/// starts and <c>rank-R.exit</c> (its exit code) when it ends normally, so the launcher can tell which rank vanished
/// (a rank killed by a signal leaves no exit file) even when MPICH's mpiexec sits between them.
/// </summary>
public sealed class LaunchedRank : IDisposable
{
    public const string DirectoryVariable = "LORAHUB_LAUNCH_DIR";
    private readonly string? folder;
    private readonly int rank;

    private LaunchedRank(string? folder, int rank)
    {
        this.folder = folder;
        this.rank = rank;
        if (folder != null)
            File.WriteAllText(Path.Combine(folder, $"rank-{rank}.pid"), System.Environment.ProcessId.ToString(CultureInfo.InvariantCulture));
    }

    /// <summary>Registers this process when a launcher started it; a no-op otherwise.</summary>
    public static LaunchedRank Register()
    {
        var folder = System.Environment.GetEnvironmentVariable(DirectoryVariable);
        if (string.IsNullOrEmpty(folder) || !Directory.Exists(folder)) return new LaunchedRank(null, 0);
        return new LaunchedRank(folder, DistributedEnvironment.FromEnvironment().Rank);
    }

    public int ExitCode { get; set; }

    /// <summary>
    /// For a rank about to end abnormally (a collective failed or timed out): leaves the reason (and, when the rank ends
    /// right away, its exit code) for the launcher, which quotes it when it names the rank. A no-op outside a launch.
    /// </summary>
    public static void RecordFailure(string message, int? exitCode = null)
    {
        var folder = System.Environment.GetEnvironmentVariable(DirectoryVariable);
        if (string.IsNullOrEmpty(folder) || !Directory.Exists(folder)) return;
        try
        {
            var rank = DistributedEnvironment.FromEnvironment().Rank;
            File.WriteAllText(Path.Combine(folder, $"rank-{rank}.error"), message);
            if (exitCode is int code) File.WriteAllText(Path.Combine(folder, $"rank-{rank}.exit"), code.ToString(CultureInfo.InvariantCulture));
        }
        catch (Exception e) when (e is IOException or DistributedException) { /* best effort: the rank is ending anyway */ }
    }

    public void Dispose()
    {
        if (folder == null) return;
        try { File.WriteAllText(Path.Combine(folder, $"rank-{rank}.exit"), ExitCode.ToString(CultureInfo.InvariantCulture)); }
        catch (IOException) { /* the launcher may have gone already */ }
    }
}
