using LoRAHub.Host.Plugins;
using LoRAHub.Host.Scripting;
using LoRAHub.Training;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace LoRAHub.Host;

/// <summary>Builds the host's service container: configuration, logging to stderr, plugins and the script runner.</summary>
public static class HostServices
{
    /// <summary>The log categories of scripts' <c>Log</c>: the script's file name (<c>finetune.csx</c>).</summary>
    public const string ScriptLogCategories = "*.csx";

    /// <param name="commandLineSettings">Settings given as command-line options (the highest-priority source).</param>
    /// <param name="hostBaseDirectory">Where appsettings.json, plugins/ and the LoRAHub.*.dll script references are.</param>
    public static IHost Build(IReadOnlyDictionary<string, string?> commandLineSettings, string hostBaseDirectory)
    {
        var builder = new HostApplicationBuilder(new HostApplicationBuilderSettings
        {
            DisableDefaults = true,
            ContentRootPath = hostBaseDirectory,
        });
        builder.Configuration
            .AddJsonFile(Path.Combine(hostBaseDirectory, "appsettings.json"), optional: true)
            .AddEnvironmentVariables(HostSettings.EnvironmentPrefix)
            .AddInMemoryCollection(commandLineSettings);
        var settings = HostSettings.From(builder.Configuration);

        builder.Logging.AddConfiguration(builder.Configuration.GetSection("Logging"));
        builder.Logging.SetMinimumLevel(settings.Verbose ? LogLevel.Debug : LogLevel.Warning);
        // Logs go to stderr so that a script's Output lines on stdout stay clean for pipes.
        builder.Logging.AddSimpleConsole(o => o.SingleLine = true)
            .AddFilter("Microsoft", LogLevel.Warning)
            // A script's own Log (category: its file name) shows Information without -v; the libraries' stay at Warning.
            .AddFilter(ScriptLogCategories, settings.Verbose ? LogLevel.Debug : LogLevel.Information);
        builder.Services.Configure<Microsoft.Extensions.Logging.Console.ConsoleLoggerOptions>(
            o => o.LogToStandardErrorThreshold = LogLevel.Trace);

        builder.Services.AddSingleton(settings);
        builder.Services.AddSingleton<IMethodRegistry>(sp =>
        {
            var folders = PluginFolders.Discover(hostBaseDirectory, PluginFolders.UserDirectory(), settings.PluginPath);
            return new PluginLoader(sp.GetRequiredService<ILoggerFactory>().CreateLogger<PluginLoader>())
            {
                // `full` ships with the trainer (recipes that make base models need no plugin) and is served like any method.
                BuiltInMethods = [new FullFineTuning()],
            }.Load(folders);
        });
        builder.Services.AddSingleton(_ => ScriptReferences.CreateDefault(hostBaseDirectory));
        builder.Services.AddSingleton(_ => new ScriptCache(ScriptCache.DefaultDirectory(settings.ScriptCache)));
        builder.Services.AddSingleton<ScriptCompiler>();
        builder.Services.AddSingleton<ScriptRunner>();
        return builder.Build();
    }
}
