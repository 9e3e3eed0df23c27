using Microsoft.Extensions.Configuration;

namespace LoRAHub.Host;

/// <summary>
/// Settings from appsettings.json, LORAHUB_* environment variables and the command line (later sources win).
/// Each setting accepts its JSON spelling and its environment spelling (PluginPath / LORAHUB_PLUGIN_PATH).
/// </summary>
public sealed record HostSettings(string? PluginPath, string? ScriptCache, bool Verbose)
{
    public const string EnvironmentPrefix = "LORAHUB_";

    public static HostSettings From(IConfiguration configuration) => new(
        Read(configuration, "PluginPath", "PLUGIN_PATH"),
        Read(configuration, "ScriptCache", "SCRIPT_CACHE"),
        bool.TryParse(Read(configuration, "Verbose", "VERBOSE"), out var verbose) && verbose);

    private static string? Read(IConfiguration configuration, string jsonKey, string environmentKey)
    {
        var value = configuration[jsonKey] ?? configuration[environmentKey];
        return string.IsNullOrWhiteSpace(value) ? null : value;
    }
}
