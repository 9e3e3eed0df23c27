namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>
/// Where libnvrtc is looked for, in order: <c>LORAHUB_NVRTC</c> (a file, or a folder holding libnvrtc); the folder of
/// the loaded libtorch_cuda / libcudart (libtorch zips and TorchSharp's CUDA packages put it there); the pip wheels next
/// to an installed PyTorch (site-packages/nvidia/cu13/lib, nvidia/cuda_nvrtc/lib, ...); then the loader's default names.
/// </summary>
internal static class NvrtcLocator
{
    public const string EnvironmentVariable = "LORAHUB_NVRTC";

    public static IEnumerable<string> Candidates()
    {
        var seen = new HashSet<string>();
        var env = Environment.GetEnvironmentVariable(EnvironmentVariable);
        if (!string.IsNullOrWhiteSpace(env))
        {
            if (File.Exists(env)) yield return env;
            else if (Directory.Exists(env))
                foreach (var f in InFolder(env)) if (seen.Add(f)) yield return f;
        }
        foreach (var folder in TorchFolders())
        {
            foreach (var f in InFolder(folder)) if (seen.Add(f)) yield return f;
            // site-packages/torch/lib -> site-packages/nvidia/*/lib (cu13 wheels: nvidia/cu13/lib; cu12: nvidia/cuda_nvrtc/lib).
            var sitePackages = Path.GetFullPath(Path.Combine(folder, "..", ".."));
            var nvidia = Path.Combine(sitePackages, "nvidia");
            if (!Directory.Exists(nvidia)) continue;
            foreach (var sub in Directory.GetDirectories(nvidia).OrderByDescending(d => d, StringComparer.Ordinal))
                foreach (var f in InFolder(Path.Combine(sub, "lib"))) if (seen.Add(f)) yield return f;
        }
        foreach (var name in new[] { "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2", "libnvrtc.so" })
            if (seen.Add(name)) yield return name;
    }

    /// <summary>Folders of the CUDA libraries the loaded libtorch uses (from /proc/self/maps).</summary>
    private static IEnumerable<string> TorchFolders()
    {
        foreach (var fragment in new[] { "libtorch_cuda.so", "libc10_cuda.so", "libcudart" })
            foreach (var path in LoadedLibraries.Find(fragment))
                if (Path.GetDirectoryName(path) is { } dir) yield return dir;
    }

    /// <summary>libnvrtc files in a folder, newest version first (libtorch zips name them libnvrtc-&lt;hash&gt;.so.12).</summary>
    private static IEnumerable<string> InFolder(string folder)
    {
        if (!Directory.Exists(folder)) return [];
        return Directory.GetFiles(folder, "libnvrtc*.so*")
            .Where(f => !Path.GetFileName(f).Contains("builtins", StringComparison.Ordinal) && !Path.GetFileName(f).Contains(".alt.", StringComparison.Ordinal))
            .OrderByDescending(f => Path.GetFileName(f).Length) // libnvrtc.so.13.0.x before the libnvrtc.so symlink
            .ThenByDescending(f => f, StringComparer.Ordinal);
    }

    /// <summary>The builtins libraries beside a libnvrtc (NVRTC opens them by name while compiling).</summary>
    public static IEnumerable<string> BuiltinsNextTo(string nvrtc)
    {
        var dir = Path.GetDirectoryName(nvrtc);
        if (dir is null || !Directory.Exists(dir)) return [];
        return Directory.GetFiles(dir, "libnvrtc-builtins*.so*").Where(f => !Path.GetFileName(f).Contains(".alt.", StringComparison.Ordinal));
    }
}
