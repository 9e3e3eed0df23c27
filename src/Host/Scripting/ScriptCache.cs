using System.Security.Cryptography;
using System.Text;

namespace LoRAHub.Host.Scripting;

/// <summary>
/// Compiled scripts by content hash. The key covers everything the assembly depends on: the script path (stack frames
/// name it), the texts of the script and its #load'ed files, the host build, the reference set and the imports.
/// </summary>
public sealed class ScriptCache(string directory)
{
    public const string DirectoryVariable = "LORAHUB_SCRIPT_CACHE";

    public string Directory { get; } = directory;

    /// <summary>$LORAHUB_SCRIPT_CACHE, else $XDG_CACHE_HOME/lorahub/scripts, else ~/.cache/lorahub/scripts.</summary>
    public static string DefaultDirectory(string? configured)
    {
        if (!string.IsNullOrWhiteSpace(configured)) return Path.GetFullPath(configured);
        var xdg = Environment.GetEnvironmentVariable("XDG_CACHE_HOME");
        var root = string.IsNullOrWhiteSpace(xdg)
            ? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache")
            : xdg;
        return Path.Combine(root, "lorahub", "scripts");
    }

    public static string Key(IReadOnlyList<(string Path, string Text)> sources, ScriptReferences references)
    {
        var text = new StringBuilder("lorahub-script-cache/1\n");
        text.Append(typeof(ScriptCache).Assembly.ManifestModule.ModuleVersionId).Append('\n');
        foreach (var assembly in references.Assemblies.OrderBy(a => a.FullName, StringComparer.Ordinal))
            text.Append(assembly.FullName).Append(' ').Append(assembly.ManifestModule.ModuleVersionId).Append('\n');
        foreach (var import in references.Imports.Order(StringComparer.Ordinal)) text.Append("using ").Append(import).Append('\n');
        foreach (var (path, content) in sources)
            text.Append("file ").Append(path).Append(' ').Append(content.Length).Append('\n').Append(content).Append('\n');
        return Convert.ToHexString(SHA256.HashData(Encoding.UTF8.GetBytes(text.ToString()))).ToLowerInvariant();
    }

    public string PathFor(string key) => Path.Combine(Directory, key + ".dll");

    public byte[]? TryRead(string key)
    {
        try
        {
            return File.ReadAllBytes(PathFor(key));
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            return null;
        }
    }

    /// <summary>Writes through a temporary file and a rename so a concurrent run never reads half an assembly.</summary>
    public void Write(string key, byte[] image)
    {
        System.IO.Directory.CreateDirectory(Directory);
        var target = PathFor(key);
        var temp = $"{target}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp";
        File.WriteAllBytes(temp, image);
        File.Move(temp, target, overwrite: true);
    }
}
