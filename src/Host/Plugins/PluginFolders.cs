namespace LoRAHub.Host.Plugins;

/// <summary>
/// Finds the folders that may hold plugins. Only folders someone named are searched (issue 21's trust rule): the
/// host's built-in <c>plugins/</c>, the per-user folder, and the plugin path (<c>--plugins</c>/<c>--plugin-path</c>,
/// <c>LORAHUB_PLUGIN_PATH</c>, <c>PluginPath</c> in appsettings.json); never the current directory, where a
/// downloaded checkout could plant code. A plugin folder is one with a built plugin in it: <c>&lt;Folder&gt;.dll</c>
/// or a <c>*.deps.json</c>, so a source folder (its build output is under bin/) is not mistaken for a plugin.
/// </summary>
public static class PluginFolders
{
    public const string PluginPathVariable = "LORAHUB_PLUGIN_PATH";

    /// <summary>
    /// Candidate folders in load order (earlier ones win a method-name clash): every subfolder of
    /// <c>&lt;hostBase&gt;/plugins</c> (a missing DLL there is reported), built plugin folders in the per-user folder,
    /// then each entry of the plugin path: a plugin folder itself or a folder of them.
    /// </summary>
    public static IReadOnlyList<string> Discover(string hostBaseDirectory, string? userDirectory, string? pluginPath)
    {
        var result = new List<string>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        void Add(string folder)
        {
            var full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(folder));
            if (seen.Add(full)) result.Add(full);
        }

        foreach (var folder in Subfolders(Path.Combine(hostBaseDirectory, "plugins"))) Add(folder);
        if (userDirectory is not null)
            foreach (var folder in Subfolders(userDirectory).Where(IsPluginFolder)) Add(folder);
        foreach (var entry in SplitPath(pluginPath))
        {
            // A missing entry is added as-is so that the loader reports it rather than it vanishing silently.
            if (!Directory.Exists(entry) || IsPluginFolder(entry)) Add(entry);
            else foreach (var folder in Subfolders(entry)) Add(folder);
        }
        return result;
    }

    /// <summary>The per-user plugin folder: $XDG_DATA_HOME/lorahub/plugins, else ~/.local/share/lorahub/plugins.</summary>
    public static string UserDirectory()
    {
        var xdg = Environment.GetEnvironmentVariable("XDG_DATA_HOME");
        var root = string.IsNullOrWhiteSpace(xdg)
            ? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".local", "share")
            : xdg;
        return Path.Combine(root, "lorahub", "plugins");
    }

    public static IEnumerable<string> SplitPath(string? pluginPath) =>
        (pluginPath ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    public static bool IsPluginFolder(string folder) =>
        File.Exists(Path.Combine(folder, Path.GetFileName(Path.TrimEndingDirectorySeparator(folder)) + ".dll")) ||
        Directory.EnumerateFiles(folder, "*.deps.json").Any();

    /// <summary>Whether a plugin path entry holds a plugin: it is a plugin folder, or one of its folders is.</summary>
    public static bool HasPlugins(string entry) => Directory.Exists(entry) && (IsPluginFolder(entry) || Subfolders(entry).Any(IsPluginFolder));

    private static IEnumerable<string> Subfolders(string folder) =>
        Directory.Exists(folder) ? Directory.GetDirectories(folder).Order(StringComparer.Ordinal) : [];
}
