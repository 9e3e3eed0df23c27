namespace LoRAHub.Host.Everyday;

/// <summary>
/// Whether two folder paths name the same place or one lies inside the other, as the file system sees them: full paths,
/// symbolic links resolved, letter case ignored where the platform's file systems ignore it (Windows, macOS).
/// </summary>
public static class FolderPaths
{
    public static StringComparison Comparison { get; } =
        OperatingSystem.IsWindows() || OperatingSystem.IsMacOS() ? StringComparison.OrdinalIgnoreCase : StringComparison.Ordinal;

    /// <summary>The full path with every existing link along it resolved; the part that does not exist yet is kept as written.</summary>
    public static string Canonical(string path) => Canonical(path, depth: 0);

    private static string Canonical(string path, int depth)
    {
        // Linux gives up after 40 links (ELOOP); a cycle would otherwise recurse forever.
        if (depth > 40) throw new IOException($"too many levels of symbolic links in {path}");
        var full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(path));
        var root = Path.GetPathRoot(full) ?? "";
        var current = root;
        foreach (var part in full[root.Length..].Split(Path.DirectorySeparatorChar, StringSplitOptions.RemoveEmptyEntries))
        {
            current = Path.Combine(current, part);
            FileSystemInfo info = Directory.Exists(current) ? new DirectoryInfo(current) : new FileInfo(current);
            // A relative link target is relative to the link's folder.
            if (info.Exists && info.LinkTarget is { } target)
                current = Canonical(Path.IsPathRooted(target) ? target : Path.Combine(Path.GetDirectoryName(current)!, target), depth + 1);
        }
        return current;
    }

    /// <summary>True when <paramref name="inner"/> is <paramref name="outer"/> or lies somewhere inside it (both canonical).</summary>
    public static bool IsSameOrInside(string inner, string outer)
    {
        if (inner.Equals(outer, Comparison)) return true;
        var prefix = outer.EndsWith(Path.DirectorySeparatorChar) ? outer : outer + Path.DirectorySeparatorChar;
        return inner.StartsWith(prefix, Comparison);
    }
}
