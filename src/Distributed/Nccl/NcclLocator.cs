using System.Runtime.InteropServices;

namespace LoRAHub.Distributed.Nccl;

/// <summary>
/// Where libnccl.so.2 is looked for, in order: <c>LORAHUB_NCCL</c> (a file, or a folder holding it); next to the
/// libtorch in use (<c>LORAHUB_LIBTORCH</c>, or the libtorch_cuda loaded in this process): its own folder (libtorch zips,
/// TorchSharp's CUDA packages) and, for a pip-installed PyTorch, <c>site-packages/nvidia/nccl/lib</c> beside
/// <c>site-packages/torch/lib</c>; then the loader's search path. Windows has no NCCL.
/// </summary>
public static class NcclLocator
{
    public const string EnvironmentVariable = "LORAHUB_NCCL";
    private const string FileName = "libnccl.so.2";

    public static IEnumerable<string> Candidates()
    {
        var env = Environment.GetEnvironmentVariable(EnvironmentVariable);
        if (!string.IsNullOrWhiteSpace(env)) yield return Directory.Exists(env) ? Path.Combine(env, FileName) : env;
        // The copy libtorch_cuda already loaded, if any: one NCCL in the process.
        foreach (var dir in LoadedFolders("libnccl.so")) yield return Path.Combine(dir, FileName);
        var torchLibs = new List<string>();
        if (Environment.GetEnvironmentVariable("LORAHUB_LIBTORCH") is { Length: > 0 } libtorch) torchLibs.Add(libtorch);
        torchLibs.AddRange(LoadedFolders("libtorch_cuda.so"));
        foreach (var lib in torchLibs.Distinct())
        {
            yield return Path.Combine(lib, FileName);
            // site-packages/torch/lib -> site-packages/nvidia/nccl/lib (or another nvidia/*/lib of the CUDA wheels)
            var nvidia = Path.GetFullPath(Path.Combine(lib, "..", "..", "nvidia"));
            yield return Path.Combine(nvidia, "nccl", "lib", FileName);
            if (Directory.Exists(nvidia))
                foreach (var sub in Directory.GetDirectories(nvidia).Order(StringComparer.Ordinal)) yield return Path.Combine(sub, "lib", FileName);
        }
        yield return FileName;
    }

    private static readonly Lazy<IntPtr> handle = new(() =>
    {
        if (OperatingSystem.IsWindows())
            throw new DistributedException("NCCL does not exist on Windows: train on one GPU there (no --nproc-per-node), or on Linux for several");
        var tried = new List<string>();
        foreach (var c in Candidates())
        {
            tried.Add(c);
            if ((c == FileName || File.Exists(c)) && NativeLibrary.TryLoad(c, out var h)) return h;
        }
        throw new DistributedException(
            $"libnccl.so.2 was not found (tried {string.Join(", ", tried)}). pip installs of PyTorch carry it in site-packages/nvidia/nccl/lib: " +
            $"set LORAHUB_LIBTORCH to that PyTorch's torch/lib, or {EnvironmentVariable} to libnccl.so.2 or its folder.");
    });

    /// <summary>Loads libnccl once (a DistributedException says where it was looked for when it is missing).</summary>
    public static IntPtr Load() => handle.Value;

    /// <summary>Folders of loaded shared libraries whose file name contains the fragment (from /proc/self/maps).</summary>
    internal static IEnumerable<string> LoadedFolders(string fragment) => LoadedPaths(fragment).Select(p => Path.GetDirectoryName(p)!).Distinct().ToList();

    /// <summary>Paths of loaded shared libraries whose file name contains the fragment (from /proc/self/maps).</summary>
    internal static IEnumerable<string> LoadedPaths(string fragment)
    {
        if (!File.Exists("/proc/self/maps")) return [];
        return File.ReadLines("/proc/self/maps")
            .Select(l => l.IndexOf('/') is var i and >= 0 ? l[i..].Trim() : null)
            .Where(p => p != null && Path.GetFileName(p).Contains(fragment, StringComparison.Ordinal) && p.Contains(".so", StringComparison.Ordinal))
            .Select(p => p!)
            .Distinct()
            .ToList();
    }
}
