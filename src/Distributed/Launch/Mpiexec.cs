using System.Diagnostics;

namespace LoRAHub.Distributed.Launch;

/// <summary>
/// Finds MPICH's launcher. Only MPICH's will do: the MPI backend binds libmpich's ABI, and another MPI's `mpiexec` on PATH
/// (Open MPI's is common, e.g. on GPU images) would start ranks that cannot talk to it, or refuse to run as root.
/// </summary>
public static class Mpiexec
{
    /// <summary>LORAHUB_MPIEXEC, else MPICH's own names (Debian's mpiexec.mpich, Hydra's), else a generic mpiexec/mpirun that is MPICH's.</summary>
    public static string? Find() => Candidates().FirstOrDefault(IsMpich);

    /// <summary>Why no MPICH launcher was found, naming a foreign one on PATH if there is one.</summary>
    public static string Missing()
    {
        var foreign = Candidates().FirstOrDefault(p => !IsMpich(p));
        return "the CPU (mpi) backend starts ranks with MPICH's mpiexec" +
               (foreign is null ? ", which is not on PATH" : $"; {foreign} is another MPI's (Open MPI?)") +
               ": install MPICH (Debian/Ubuntu: apt-get install -y mpich libmpich-dev; setup.sh does) or point LORAHUB_MPIEXEC at " +
               "MPICH's mpiexec, or train on GPUs (nccl)";
    }

    private static IEnumerable<string> Candidates()
    {
        if (Environment.GetEnvironmentVariable("LORAHUB_MPIEXEC") is { Length: > 0 } set) yield return set;
        var dirs = (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries);
        foreach (var name in new[] { "mpiexec.mpich", "mpiexec.hydra", "mpiexec", "mpirun" })
            foreach (var dir in dirs)
                if (File.Exists(Path.Combine(dir, name))) yield return Path.Combine(dir, name);
    }

    private static readonly Dictionary<string, bool> checkedPaths = new();

    private static bool IsMpich(string path)
    {
        lock (checkedPaths)
        {
            if (!checkedPaths.TryGetValue(path, out var yes)) checkedPaths[path] = yes = Probe(path);
            return yes;
        }
    }

    // Debian's alternatives link mpiexec to mpiexec.mpich or mpiexec.openmpi; otherwise ask the launcher itself
    // (Hydra's --version names HYDRA and MPICH; Open MPI's names Open MPI / OpenRTE / PRRTE).
    private static bool Probe(string path)
    {
        try
        {
            var target = new FileInfo(path).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? path;
            var name = Path.GetFileName(target);
            if (name.Contains("mpich", StringComparison.OrdinalIgnoreCase) || name.Contains("hydra", StringComparison.OrdinalIgnoreCase)) return true;
            if (name.Contains("openmpi", StringComparison.OrdinalIgnoreCase) || name.Contains("orterun", StringComparison.OrdinalIgnoreCase)) return false;
            var info = new ProcessStartInfo(path, "--version") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            using var process = Process.Start(info);
            if (process is null) return false;
            var stdout = process.StandardOutput.ReadToEndAsync();
            var stderr = process.StandardError.ReadToEndAsync();
            if (!process.WaitForExit(5000)) { process.Kill(entireProcessTree: true); return false; }
            var text = stdout.Result + stderr.Result;
            return text.Contains("HYDRA", StringComparison.OrdinalIgnoreCase) || text.Contains("MPICH", StringComparison.OrdinalIgnoreCase);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or System.ComponentModel.Win32Exception or InvalidOperationException)
        {
            return false;
        }
    }
}
