namespace LoRAHub.Host.Everyday;

/// <summary>
/// The <c>new</c> command's work, callable from scripts. The sources travel inside the host (its <c>scaffold/</c>
/// folder, copied from the repository's examples/ and templates/ at build time), so an installed tool needs no checkout.
/// </summary>
public static class Scaffold
{
    /// <summary>
    /// A training script that runs as it is: examples/finetune.csx with the tasks it #loads and the embedded base model
    /// beside it (<c>dotnet loraHub run &lt;folder&gt;/finetune.csx</c>). Returns the files written.
    /// </summary>
    public static IReadOnlyList<string> NewScript(string hostBaseDirectory, string folder, bool force = false) =>
        Copy(Path.Combine(hostBaseDirectory, "scaffold", "script"), folder, force, s => s, n => n);

    /// <summary>
    /// A method plugin project from templates/MethodPlugin, with what <c>dotnet new lorahub-method</c> replaces replaced:
    /// the project and class names, the lower-case method name, the upper-case PEFT type (MYMETHOD, as PEFT spells its
    /// types), and the host it compiles against (this one).
    /// </summary>
    public static IReadOnlyList<string> NewMethod(string hostBaseDirectory, string name, string folder, bool force = false)
    {
        if (string.IsNullOrEmpty(name) || !char.IsAsciiLetter(name[0]) || !name.All(char.IsAsciiLetterOrDigit))
            throw new ArgumentException($"bad plugin name '{name}': a C# identifier of letters and digits, starting with a letter (e.g. MyMethod)");
        var home = Path.TrimEndingDirectorySeparator(Path.GetFullPath(hostBaseDirectory));
        string Text(string s) => s.Replace("MethodPlugin", name).Replace("methodplugin", name.ToLowerInvariant())
            .Replace("METHODPLUGIN", name.ToUpperInvariant()).Replace("LORAHUB_HOME_DEFAULT", home);
        return Copy(Path.Combine(hostBaseDirectory, "scaffold", "method"), folder, force, Text, n => n.Replace("MethodPlugin", name));
    }

    private static List<string> Copy(string source, string target, bool force, Func<string, string> text, Func<string, string> rename)
    {
        if (!Directory.Exists(source)) throw new DirectoryNotFoundException($"the host has no {source}: reinstall the tool or rebuild the host");
        var full = Path.GetFullPath(target);
        if (Directory.Exists(full) && Directory.EnumerateFileSystemEntries(full).Any() && !force)
            throw new IOException($"{full} is not empty; choose another folder or pass --force");
        var written = new List<string>();
        foreach (var file in Directory.GetFiles(source, "*", SearchOption.AllDirectories).Order(StringComparer.Ordinal))
        {
            var relative = Path.GetRelativePath(source, file);
            if (relative.Split(Path.DirectorySeparatorChar)[0] == ".template.config") continue;
            var destination = Path.Combine(full, rename(relative));
            Directory.CreateDirectory(Path.GetDirectoryName(destination)!);
            if (IsText(file)) File.WriteAllText(destination, text(File.ReadAllText(file)));
            else File.Copy(file, destination, overwrite: true);
            written.Add(destination);
        }
        return written;
    }

    private static bool IsText(string file) => Path.GetExtension(file) is ".cs" or ".csx" or ".csproj" or ".md" or ".props" or ".targets" or ".json"
        && !file.EndsWith(".safetensors", StringComparison.Ordinal);
}
