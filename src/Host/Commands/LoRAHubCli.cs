using System.CommandLine;
using LoRAHub.TorchExtensions;
using Microsoft.Extensions.Hosting;

namespace LoRAHub.Host.Commands;

/// <summary>
/// The `loraHub` command line. Commands build the service container only once parsing succeeded, because the
/// command-line options are the last configuration source.
/// </summary>
public sealed class LoRAHubCli
{
    public static readonly Option<bool> Verbose = new("--verbose", "-v")
    {
        Description = "Debug logging and script compile/cache timings",
        Recursive = true,
    };

    public static readonly Option<string?> PluginPath = new("--plugin-path")
    {
        Description = $"Extra plugin folders ('{Path.PathSeparator}'-separated), like LORAHUB_PLUGIN_PATH",
        Recursive = true,
    };

    private readonly string hostBaseDirectory;

    public LoRAHubCli(TextWriter output, TextWriter error, string? hostBaseDirectory = null)
    {
        Output = output;
        Error = error;
        this.hostBaseDirectory = hostBaseDirectory ?? AppContext.BaseDirectory;
        Run = RunCommand.Create(this);
        Root = new RootCommand("LoRAHub: parameter-efficient fine-tuning with pluggable methods and C# scripts")
        {
            Run, MethodsCommand.Create(this), InfoCommand.Create(this), Verbose, PluginPath,
        };
    }

    public TextWriter Output { get; }
    public TextWriter Error { get; }
    public RootCommand Root { get; }
    private Command Run { get; }

    /// <summary>The arguments after the script path of `run`.</summary>
    public string[] ScriptArgs { get; private set; } = [];

    public async Task<int> InvokeAsync(IReadOnlyList<string> args)
    {
        var (hostArgs, scriptArgs) = ScriptArguments.Split(Root, Run, args);
        ScriptArgs = scriptArgs;
        var parse = Root.Parse(hostArgs);
        if (parse.Errors.Count > 0)
        {
            foreach (var error in parse.Errors) Error.WriteLine($"error: {error.Message}");
            Error.WriteLine("Run 'loraHub --help' for usage.");
            return ExitCodes.UsageError;
        }
        return await parse.InvokeAsync(new InvocationConfiguration { Output = Output, Error = Error, EnableDefaultExceptionHandler = false });
    }

    /// <summary>Runs a command's body with the service container; an unexpected exception is reported as exit code 1.</summary>
    public async Task<int> Execute(ParseResult parse, Func<IHost, Task<int>> body)
    {
        var settings = new Dictionary<string, string?>();
        if (parse.GetValue(Verbose)) settings["Verbose"] = "true";
        if (parse.GetValue(PluginPath) is { } pluginPath) settings["PluginPath"] = pluginPath;
        try
        {
            // Idempotent; the process entry point has already done it (before any TorchSharp call), tests have not.
            TorchRuntime.Initialize();
            using var host = HostServices.Build(settings, hostBaseDirectory);
            return await body(host);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            Error.WriteLine($"error: {e.GetType().Name}: {e.Message}");
            return ExitCodes.ScriptError;
        }
    }
}
