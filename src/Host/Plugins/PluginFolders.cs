namespace LoRAHub.Host.Plugins;

/// <summary>
/// Finds the folders that may hold plugins. A plugin folder is one with a built plugin in it: <c>&lt;Folder&gt;.dll</c>
/// or a <c>*.deps.json</c>. A repository's <c>plugins/LoRA</c> source folder has neither (its build output is under
/// bin/), so running from a checkout does not mistake sources for plugins.
/// </summary>
public static class PluginFolders
{
    public const string PluginPathVariable = "LORAHUB_PLUGIN_PATH";

    /// <summary>
    /// Candidate folders in load order (earlier ones win a method-name clash): every subfolder of
    /// <c>&lt;hostBase&gt;/plugins</c> (a missing DLL there is reported), built plugin folders under
    /// <c>&lt;currentDirectory&gt;/plugins</c>, then each entry of the plugin path: a plugin folder itself or a folder of them.
    /// </summary>
    public static IReadOnlyList<string> Discover(string hostBaseDirectory, string? currentDirectory, string? pluginPath)
    {
        var result = new List<string>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        void Add(string folder)
        {
            var full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(folder));
            if (seen.Add(full)) result.Add(full);
        }

        foreach (var folder in Subfolders(Path.Combine(hostBaseDirectory, "plugins"))) Add(folder);
        if (currentDirectory is not null)
            foreach (var folder in Subfolders(Path.Combine(currentDirectory, "plugins")).Where(IsPluginFolder)) Add(folder);
        foreach (var entry in SplitPath(pluginPath))
        {
            // A missing entry is added as-is so that the loader reports it rather than it vanishing silently.
            if (!Directory.Exists(entry) || IsPluginFolder(entry)) Add(entry);
            else foreach (var folder in Subfolders(entry)) Add(folder);
        }
        return result;
    }

    public static IEnumerable<string> SplitPath(string? pluginPath) =>
        (pluginPath ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    public static bool IsPluginFolder(string folder) =>
        File.Exists(Path.Combine(folder, Path.GetFileName(Path.TrimEndingDirectorySeparator(folder)) + ".dll")) ||
        Directory.EnumerateFiles(folder, "*.deps.json").Any();

    private static IEnumerable<string> Subfolders(string folder) =>
        Directory.Exists(folder) ? Directory.GetDirectories(folder).Order(StringComparer.Ordinal) : [];
}
