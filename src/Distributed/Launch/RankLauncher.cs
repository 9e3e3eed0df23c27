using System.Diagnostics;
using System.Globalization;

namespace LoRAHub.Distributed.Launch;

/// <summary>
/// Starts the ranks of this node like torchrun: each gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK,
/// MASTER_ADDR and MASTER_PORT on top of the launcher's own environment (NCCL_* settings such as NCCL_NVLS_ENABLE=0
/// pass through unchanged). With the mpi backend the ranks run under MPICH's mpiexec, which MPI needs to wire them up;
/// RANK then comes from PMI_RANK. When a rank fails (non-zero exit, or killed), the others get
/// <see cref="LaunchOptions.KillGrace"/> to end on their own, then are killed; the launcher reports the rank and
/// returns a non-zero code. No rank is left hanging.
/// </summary>
public static class RankLauncher
{
    public const int FailureExitCode = 1;

    /// <summary>A rank (and the launcher) stopped by Ctrl+C: 128 + SIGINT, what a shell reports for a program SIGINT ended.</summary>
    public const int InterruptedExitCode = 130;

    /// <summary>Runs the ranks to completion; returns 0 when every rank exited 0.</summary>
    /// <param name="output">Where the ranks' standard output goes under mpiexec (which relays it); direct ranks write to this process's.</param>
    public static int Run(LaunchOptions options, string executable, IReadOnlyList<string> arguments, TextWriter error,
        IReadOnlyDictionary<string, string>? extraEnvironment = null, TextWriter? output = null)
    {
        options.Validate();
        var folder = Directory.CreateTempSubdirectory("lorahub-launch-").FullName;
        // Ctrl+C reaches the ranks too (same terminal process group): they save a checkpoint and stop together, while
        // the launcher keeps supervising them instead of dying first.
        ConsoleCancelEventHandler keepSupervising = (_, e) => e.Cancel = true;
        Console.CancelKeyPress += keepSupervising;
        try
        {
            var env = new Dictionary<string, string>
            {
                ["WORLD_SIZE"] = options.WorldSize.ToString(CultureInfo.InvariantCulture),
                ["LOCAL_WORLD_SIZE"] = options.NprocPerNode.ToString(CultureInfo.InvariantCulture),
                ["GROUP_RANK"] = options.NodeRank.ToString(CultureInfo.InvariantCulture),
                ["MASTER_ADDR"] = options.MasterAddr,
                ["MASTER_PORT"] = options.MasterPort.ToString(CultureInfo.InvariantCulture),
                [distributed.BackendVariable] = options.Backend,
                [LaunchedRank.DirectoryVariable] = folder,
            };
            if (extraEnvironment != null)
                foreach (var (k, v) in extraEnvironment) env[k] = v;
            return options.Backend == "mpi"
                ? RunUnderMpiexec(options, executable, arguments, env, folder, error, output ?? Console.Out)
                : RunDirect(options, executable, arguments, env, folder, error);
        }
        finally
        {
            Console.CancelKeyPress -= keepSupervising;
            try { Directory.Delete(folder, recursive: true); }
            catch (IOException) { }
        }
    }

    private static int RunDirect(LaunchOptions options, string executable, IReadOnlyList<string> arguments, Dictionary<string, string> env,
        string folder, TextWriter error)
    {
        var ranks = new List<(int rank, Process process)>();
        try
        {
            for (var local = 0; local < options.NprocPerNode; local++)
            {
                var rank = options.NodeRank * options.NprocPerNode + local;
                var info = Start(executable, arguments, env);
                info.Environment["RANK"] = rank.ToString(CultureInfo.InvariantCulture);
                info.Environment["LOCAL_RANK"] = local.ToString(CultureInfo.InvariantCulture);
                ranks.Add((rank, Process.Start(info) ?? throw new InvalidOperationException($"could not start rank {rank}")));
            }
            return Supervise(options, ranks, folder, error, mpiexec: null);
        }
        finally
        {
            foreach (var (_, p) in ranks) Kill(p);
        }
    }

    private static int RunUnderMpiexec(LaunchOptions options, string executable, IReadOnlyList<string> arguments, Dictionary<string, string> env,
        string folder, TextWriter error, TextWriter output)
    {
        var mpiexec = Mpiexec.Find() ?? throw new ArgumentException(Mpiexec.Missing());
        env["LORAHUB_RANK_OFFSET"] = (options.NodeRank * options.NprocPerNode).ToString(CultureInfo.InvariantCulture);
        var args = new List<string> { "-n", options.NprocPerNode.ToString(CultureInfo.InvariantCulture), executable };
        args.AddRange(arguments);
        var info = Start(mpiexec, args, env);
        info.RedirectStandardOutput = true;
        var process = Process.Start(info) ?? throw new InvalidOperationException("could not start mpiexec");
        // mpiexec relays the ranks' output and, when one fails, names its PID ("=   PID 123 RUNNING AT host") and exit code.
        var hydra = new HydraReport();
        var relay = new Thread(() =>
        {
            while (process.StandardOutput.ReadLine() is { } line)
            {
                hydra.Scan(line);
                lock (output) output.WriteLine(line);
            }
            lock (output) output.Flush();
        }) { IsBackground = true, Name = "lorahub-mpiexec-relay" };
        relay.Start();
        try
        {
            return Supervise(options, [], folder, error, process, hydra, relay);
        }
        finally
        {
            Kill(process);
        }
    }

    private static ProcessStartInfo Start(string executable, IEnumerable<string> arguments, Dictionary<string, string> env)
    {
        var info = new ProcessStartInfo(executable) { UseShellExecute = false };
        foreach (var a in arguments) info.ArgumentList.Add(a);
        // RANK/LOCAL_RANK of an outer launcher must not leak into ours.
        foreach (var name in new[] { "RANK", "LOCAL_RANK", "PMI_RANK", "PMI_SIZE" }) info.Environment.Remove(name);
        foreach (var (k, v) in env) info.Environment[k] = v;
        return info;
    }

    /// <summary>
    /// Waits for the ranks. Direct ranks are watched as child processes; under mpiexec the ranks' pid files tell which
    /// rank vanished without writing its exit file (killed) or wrote a non-zero exit code.
    /// </summary>
    private static int Supervise(LaunchOptions options, List<(int rank, Process process)> direct, string folder, TextWriter error, Process? mpiexec,
        HydraReport? hydra = null, Thread? relay = null)
    {
        string? failure = null;
        int? failedRank = null;
        Stopwatch? sinceFailure = null;
        // A direct rank that exited 130 stopped at Ctrl+C; the others stop at the same step (they agree on it), so this is
        // the launcher's result unless they do not end within the grace period.
        int? interruptedRank = null;
        var pids = new Dictionary<int, int>();
        while (true)
        {
            if (mpiexec == null)
            {
                foreach (var (rank, p) in direct)
                    if (failure == null && p.HasExited && p.ExitCode != 0)
                    {
                        if (p.ExitCode == InterruptedExitCode)
                        {
                            interruptedRank ??= rank;
                            continue;
                        }
                        failure = Describe(rank, p.Id, p.ExitCode) + Reason(folder, rank);
                        failedRank = rank;
                    }
                if (direct.All(r => r.process.HasExited)) break;
                if (failure == null && interruptedRank is int stoppedRank)
                {
                    sinceFailure ??= Stopwatch.StartNew();
                    if (sinceFailure.Elapsed > options.KillGrace)
                        (failure, failedRank) = ($"rank {stoppedRank} stopped at Ctrl+C, but not every other rank ended within {options.KillGrace.TotalSeconds:0} s", stoppedRank);
                }
            }
            else
            {
                ReadPids(folder, pids);
                if (failure == null && FailedUnderMpiexec(folder, pids) is { } f) (failedRank, failure) = f;
                if (mpiexec.HasExited)
                {
                    relay?.Join(TimeSpan.FromSeconds(5));
                    ReadPids(folder, pids);
                    if (failure == null && FailedUnderMpiexec(folder, pids) is { } late) (failedRank, failure) = late;
                    if (failure == null && hydra?.Pid is int pid)
                    {
                        var rank = pids.FirstOrDefault(kv => kv.Value == pid, new KeyValuePair<int, int>(-1, 0)).Key;
                        failedRank = rank >= 0 ? rank : null;
                        failure = (rank >= 0 ? $"rank {rank} (pid {pid})" : $"the process with pid {pid}") +
                            (hydra.ExitCode is int code && code is > 0 and < 64 && hydra.Signaled ? $" was killed by signal {code}{SignalName(code)}" :
                             hydra.ExitCode is int c ? $" exited with code {c}" : " failed");
                    }
                    if (failure == null && mpiexec.ExitCode != 0) failure = $"mpiexec exited with code {mpiexec.ExitCode} before every rank finished";
                    break;
                }
            }
            if (failure != null)
            {
                sinceFailure ??= Stopwatch.StartNew();
                if (sinceFailure.Elapsed > options.KillGrace) break;
            }
            Thread.Sleep(20);
        }
        if (failure == null) return interruptedRank is null ? 0 : InterruptedExitCode;
        error.WriteLine($"error: {failure}; the other ranks were stopped{(failedRank is int r ? $" (failed rank: {r})" : "")}");
        return FailureExitCode;
    }

    /// <summary>What mpiexec (hydra) prints about the first process that ended badly.</summary>
    private sealed class HydraReport
    {
        public int? Pid { get; private set; }
        public int? ExitCode { get; private set; }
        public bool Signaled { get; private set; }

        public void Scan(string line)
        {
            var text = line.Trim('=', ' ');
            if (Pid == null && text.StartsWith("PID ", StringComparison.Ordinal) && int.TryParse(text.Split(' ')[1], out var pid)) Pid = pid;
            else if (ExitCode == null && text.StartsWith("EXIT CODE: ", StringComparison.Ordinal) && int.TryParse(text[11..], out var code)) ExitCode = code;
            else if (text.Contains("(signal ", StringComparison.Ordinal)) Signaled = true;
        }
    }

    private static void ReadPids(string folder, Dictionary<int, int> pids)
    {
        foreach (var file in Directory.GetFiles(folder, "rank-*.pid"))
        {
            var name = Path.GetFileNameWithoutExtension(file);
            if (!int.TryParse(name.AsSpan(5), out var rank) || pids.ContainsKey(rank)) continue;
            try
            {
                if (int.TryParse(File.ReadAllText(file), out var pid)) pids[rank] = pid;
            }
            catch (IOException) { /* still being written */ }
        }
    }

    private static (int, string)? FailedUnderMpiexec(string folder, Dictionary<int, int> pids)
    {
        foreach (var (rank, pid) in pids.OrderBy(p => p.Key))
        {
            var exitFile = Path.Combine(folder, $"rank-{rank}.exit");
            if (File.Exists(exitFile))
            {
                if (int.TryParse(SafeRead(exitFile), out var code) && code != 0) return (rank, Describe(rank, pid, code) + Reason(folder, rank));
                continue;
            }
        }
        return null;
    }

    /// <summary>": why" when the rank left a reason (<see cref="LaunchedRank.RecordFailure"/>).</summary>
    private static string Reason(string folder, int rank)
    {
        var file = Path.Combine(folder, $"rank-{rank}.error");
        return File.Exists(file) && SafeRead(file) is { Length: > 0 } why ? $" ({why})" : "";
    }

    private static string SafeRead(string file)
    {
        try { return File.ReadAllText(file).Trim(); }
        catch (IOException) { return ""; }
    }

    private static string Describe(int rank, int pid, int exitCode) => exitCode > 128 && exitCode < 160 && !OperatingSystem.IsWindows()
        ? $"rank {rank} (pid {pid}) was killed by signal {exitCode - 128}{SignalName(exitCode - 128)}"
        : $"rank {rank} (pid {pid}) exited with code {exitCode}";

    private static string SignalName(int signal) => signal switch
    {
        9 => " (SIGKILL)",
        15 => " (SIGTERM)",
        6 => " (SIGABRT)",
        11 => " (SIGSEGV)",
        2 => " (SIGINT)",
        _ => "",
    };

    private static void Kill(Process p)
    {
        try
        {
            if (!p.HasExited) p.Kill(entireProcessTree: true);
            p.WaitForExit(5000);
        }
        catch (InvalidOperationException) { }
        catch (System.ComponentModel.Win32Exception) { }
    }
}
