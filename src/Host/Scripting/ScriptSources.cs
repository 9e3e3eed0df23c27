using System.Text.RegularExpressions;

namespace LoRAHub.Host.Scripting;

/// <summary>
/// A script and the files it pulls in with <c>#load</c>, found without Roslyn so a cache hit does not pay for loading
/// the compiler. A directive inside a block comment is also picked up; that only adds a file to the cache key.
/// </summary>
public static partial class ScriptSources
{
    [GeneratedRegex("""^\s*#load\s+"(?<path>[^"]+)"\s*$""", RegexOptions.Multiline)]
    private static partial Regex LoadDirective();

    /// <summary>(full path, text) of the script and, recursively, every existing #load'ed file, each once.</summary>
    public static IReadOnlyList<(string Path, string Text)> Collect(string scriptPath)
    {
        var result = new List<(string, string)>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        void Visit(string path)
        {
            if (!seen.Add(path) || !File.Exists(path)) return;
            var text = File.ReadAllText(path);
            result.Add((path, text));
            foreach (Match m in LoadDirective().Matches(text))
                Visit(Path.GetFullPath(m.Groups["path"].Value, Path.GetDirectoryName(path)!));
        }
        Visit(Path.GetFullPath(scriptPath));
        return result;
    }
}
