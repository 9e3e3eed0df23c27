using System.CommandLine;
using LoRAHub.Host.Plugins;
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

    public static readonly Option<string?> PluginPath = new("--plugins", "--plugin-path")
    {
        Description = $"Extra plugin folders ('{Path.PathSeparator}'-separated), like LORAHUB_PLUGIN_PATH; each a plugin folder or a folder of them",
        Recursive = true,
    };


    public LoRAHubCli(TextWriter output, TextWriter error, string? hostBaseDirectory = null)
    {
        Output = output;
        Error = error;
        HostBaseDirectory = hostBaseDirectory ?? AppContext.BaseDirectory;
        Run = RunCommand.Create(this);
        Root = new RootCommand("LoRAHub: parameter-efficient fine-tuning with pluggable methods and C# scripts")
        {
            Run, MethodsCommand.Create(this), InfoCommand.Create(this), MergeCommand.Create(this), GenerateCommand.Create(this),
            EvalCommand.Create(this), NewCommand.Create(this), ServeCommand.Create(this), Verbose, PluginPath,
        };
        Root.Options.OfType<VersionOption>().Single().Action = new VersionAction(this);
    }

    /// <summary>Where the host's assemblies, plugins/ and scaffold/ are (the tool's install folder when installed).</summary>
    public string HostBaseDirectory { get; }

    public TextWriter Output { get; }
    public TextWriter Error { get; }

    /// <summary>
    /// --version prints the host's own version (the default action prints the entry assembly's, which is a test
    /// runner's when the CLI runs in-process).
    /// </summary>
    private sealed class VersionAction(LoRAHubCli cli) : System.CommandLine.Invocation.SynchronousCommandLineAction
    {
        public override int Invoke(ParseResult parseResult)
        {
            cli.Output.WriteLine(typeof(LoRAHubCli).Assembly
                .GetCustomAttributes(typeof(System.Reflection.AssemblyInformationalVersionAttribute), false)
                .OfType<System.Reflection.AssemblyInformationalVersionAttribute>().FirstOrDefault()?.InformationalVersion ?? "unknown");
            return ExitCodes.Ok;
        }
    }
    public RootCommand Root { get; }
    private Command Run { get; }

    /// <summary>The arguments after the script path of `run`.</summary>
    public string[] ScriptArgs { get; private set; } = [];

    public async Task<int> InvokeAsync(IReadOnlyList<string> args)
    {
        var (hostArgs, scriptArgs) = ScriptArguments.Split(Root, Run, args);
        ScriptArgs = scriptArgs;
        // Once, from the command the user typed: not again from each rank that `run --nproc-per-node` starts.
        if (ScriptArguments.HostOptionsAfterScript(Run, hostArgs, scriptArgs) is { } note
            && !Distributed.DistributedEnvironment.FromEnvironment().IsDistributed)
            Error.WriteLine(note);
        var parse = Root.Parse(hostArgs);
        if (parse.Errors.Count > 0)
        {
            foreach (var error in parse.Errors) Error.WriteLine($"error: {error.Message}");
            Error.WriteLine("Run 'dotnet loraHub --help' for usage.");
            return ExitCodes.UsageError;
        }
        return await parse.InvokeAsync(new InvocationConfiguration { Output = Output, Error = Error, EnableDefaultExceptionHandler = false });
    }

    /// <summary>
    /// Runs a command body, reporting bad input (arguments, missing files or folders, an output folder in the way) as a
    /// usage error with its message; anything else goes on to <see cref="Execute"/>'s handler.
    /// </summary>
    public Task<int> Guard(Func<int> body)
    {
        try
        {
            return Task.FromResult(body());
        }
        catch (Exception e) when (e is ArgumentException or FileNotFoundException or DirectoryNotFoundException or IOException)
        {
            Error.WriteLine($"error: {e.Message}");
            return Task.FromResult(ExitCodes.UsageError);
        }
    }

    /// <summary>Runs a command's body with the service container; an unexpected exception is reported as exit code 1.</summary>
    public async Task<int> Execute(ParseResult parse, Func<IHost, Task<int>> body)
    {
        var settings = new Dictionary<string, string?>();
        if (parse.GetValue(Verbose)) settings["Verbose"] = "true";
        if (parse.GetValue(PluginPath) is { } pluginPath)
        {
            if (CheckPluginPath(pluginPath) is { } code) return code;
            settings["PluginPath"] = pluginPath;
        }
        try
        {
            // Idempotent; the process entry point has already done it (before any TorchSharp call), tests have not.
            TorchRuntime.Initialize();
            using var host = HostServices.Build(settings, HostBaseDirectory);
            return await body(host);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            Error.WriteLine($"error: {Describe(e)}");
            return ExitCodes.ScriptError;
        }
    }

    /// <summary>
    /// --plugins as given: a folder that does not exist is a usage error (a typo would otherwise leave its methods
    /// silently missing), one without a built plugin in or under it a note.
    /// </summary>
    private int? CheckPluginPath(string pluginPath)
    {
        foreach (var entry in PluginFolders.SplitPath(pluginPath))
        {
            var full = Path.GetFullPath(entry);
            if (!Directory.Exists(full))
            {
                Error.WriteLine($"error: --plugins folder {full} does not exist; pass a plugin folder (its built <Name>.dll) or a folder of them");
                return ExitCodes.UsageError;
            }
            if (!PluginFolders.HasPlugins(full))
                Error.WriteLine($"note: no method plugins in {full} (--plugins): neither it nor a folder in it holds a built plugin (<Name>.dll or a *.deps.json); build the plugin and pass its output folder");
        }
        return null;
    }

    /// <summary>
    /// An error's text for the error line: the message alone for bad input and for our own exceptions (their messages
    /// say the cause and the fix), the type name before it for anything else, where it helps a bug report.
    /// </summary>
    public static string Describe(Exception e) => IsExpected(e) ? e.Message : $"{e.GetType().Name}: {e.Message}";

    private static bool IsExpected(Exception e) =>
        e is (ArgumentException and not ArgumentNullException) or IOException or InvalidDataException or UnauthorizedAccessException
            or NotSupportedException
        || e.GetType().Namespace?.StartsWith("LoRAHub", StringComparison.Ordinal) == true;
}
