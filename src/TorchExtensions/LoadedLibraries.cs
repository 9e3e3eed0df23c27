namespace LoRAHub.TorchExtensions;

/// <summary>The shared libraries mapped into this process (from /proc/self/maps): which libtorch and CUDA runtime are really loaded.</summary>
public static class LoadedLibraries
{
    /// <summary>Distinct paths of mapped files whose name contains <paramref name="fragment"/> (e.g. "libtorch_cpu.so").</summary>
    public static IReadOnlyList<string> Find(string fragment)
    {
        var result = new List<string>();
        const string maps = "/proc/self/maps";
        if (!File.Exists(maps)) return result;
        foreach (var line in File.ReadLines(maps))
        {
            var slash = line.IndexOf('/');
            if (slash < 0) continue;
            var path = line[slash..].Trim();
            if (path.EndsWith(" (deleted)", StringComparison.Ordinal)) path = path[..^10];
            if (Path.GetFileName(path).Contains(fragment, StringComparison.Ordinal) && !result.Contains(path)) result.Add(path);
        }
        return result;
    }

    /// <summary>The first mapped library whose file name contains <paramref name="fragment"/>, or null.</summary>
    public static string? First(string fragment) => Find(fragment).FirstOrDefault();
}
