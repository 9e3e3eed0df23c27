using System.CommandLine;
using LoRAHub.Host.Plugins;
using LoRAHub.Host.Scripting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using static TorchSharp.torch;

namespace LoRAHub.Host.Commands;

/// <summary><c>run &lt;script.csx&gt; [script args...]</c></summary>
public static class RunCommand
{
    public static readonly Argument<string> Script = new("script") { Description = "The C# script (.csx) to run" };

    public static readonly Argument<string[]> ScriptArgs = new("args")
    {
        Description = "Arguments for the script (everything after the script path)",
        Arity = ArgumentArity.ZeroOrMore,
    };

    public static readonly Option<string?> Method = new("--method") { Description = "Method name the script reads as MethodName" };

    public static readonly Option<string?> DeviceOption = new("--device") { Description = "cpu, cuda or cuda:N (default: cuda when available, else cpu)" };

    public static Command Create(LoRAHubCli cli)
    {
        var command = new Command("run", "Run a C# training script") { Script, ScriptArgs, Method, DeviceOption };
        command.SetAction((parse, _) => cli.Execute(parse, host => RunAsync(parse, host, cli)));
        return command;
    }

    private static async Task<int> RunAsync(ParseResult parse, IHost host, LoRAHubCli cli)
    {
        var scriptPath = Path.GetFullPath(parse.GetValue(Script)!);
        if (!File.Exists(scriptPath))
        {
            cli.Error.WriteLine($"error: script not found: {scriptPath}");
            return ExitCodes.UsageError;
        }
        Device device;
        try
        {
            device = parse.GetValue(DeviceOption) is { } text ? HostDevice.Parse(text) : HostDevice.Default();
        }
        catch (ArgumentException e)
        {
            cli.Error.WriteLine($"error: {e.Message}");
            return ExitCodes.UsageError;
        }

        var services = host.Services;
        var settings = services.GetRequiredService<HostSettings>();
        var log = services.GetRequiredService<ILoggerFactory>().CreateLogger(Path.GetFileName(scriptPath));
        var result = await services.GetRequiredService<ScriptRunner>().RunAsync(
            scriptPath,
            directory => new ScriptHost(cli.ScriptArgs, services.GetRequiredService<IMethodRegistry>(), parse.GetValue(Method),
                device, log, services, directory, cli.Output),
            cli.Error,
            settings.Verbose);
        return result.ExitCode;
    }
}
