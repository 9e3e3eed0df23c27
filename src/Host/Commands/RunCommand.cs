using System.CommandLine;
using LoRAHub.Distributed.Launch;
using LoRAHub.Host.Launch;
using LoRAHub.Host.Plugins;
using LoRAHub.Host.Scripting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Host.Commands;

/// <summary>
/// <c>run [--nproc-per-node N ...] &lt;script.csx&gt; [script args...]</c>. With --nproc-per-node this process launches N
/// ranks that each run the script (see <see cref="LaunchCommandLine"/>); a rank itself finds its place in the run
/// through torchrun's environment variables, and the trainer goes data parallel by itself.
/// </summary>
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
        foreach (var option in LaunchCommandLine.Options) command.Options.Add(option);
        command.SetAction((parse, _) => parse.GetValue(LaunchCommandLine.NprocPerNode) is int n
            ? cli.Guard(() => Launch(parse, cli, n))
            : parse.GetValue(LaunchCommandLine.Nnodes) != 1 || parse.GetValue(LaunchCommandLine.NodeRank) != 0
                ? cli.Guard(() => throw new ArgumentException("--nnodes and --node-rank need --nproc-per-node (the ranks to start on this machine)"))
                : cli.Execute(parse, host => RunAsync(parse, host, cli)));
        return command;
    }

    private static int Launch(ParseResult parse, LoRAHubCli cli, int nproc)
    {
        var scriptPath = Path.GetFullPath(parse.GetValue(Script)!);
        if (!File.Exists(scriptPath)) throw new FileNotFoundException($"script not found: {scriptPath}");
        var device = parse.GetValue(DeviceOption) is { } text ? HostDevice.Parse(text) : HostDevice.Default();
        return LaunchCommandLine.Launch(parse, cli, scriptPath, device, nproc);
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

        // An unknown --method fails now, not when the script calls Method() after loading its data and model.
        if (parse.GetValue(Method) is { } methodName)
            try
            {
                host.Services.GetRequiredService<IMethodRegistry>().Get(methodName);
            }
            catch (KeyNotFoundException e)
            {
                cli.Error.WriteLine($"error: --method {methodName}: {e.Message} (`dotnet loraHub methods` lists them with their plugins)");
                return ExitCodes.UsageError;
            }

        // A rank of a multi-GPU run trains on the GPU of its local rank.
        var env = Distributed.DistributedEnvironment.FromEnvironment();
        if (env.IsDistributed && device.type == DeviceType.CUDA)
        {
            device = HostDevice.Parse($"cuda:{env.LocalRank}");
            Distributed.distributed.set_device(env.LocalRank);
        }

        using var launched = LaunchedRank.Register();
        var services = host.Services;
        var settings = services.GetRequiredService<HostSettings>();
        var log = services.GetRequiredService<ILoggerFactory>().CreateLogger(Path.GetFileName(scriptPath));
        ScriptRunResult result;
        // Ctrl+C while the script runs stops training gracefully; once it has ended, Ctrl+C is plain again.
        using (var ctrlC = new ConsoleCancellation(cli.Error))
            result = await services.GetRequiredService<ScriptRunner>().RunAsync(
                scriptPath,
                directory => new ScriptHost(cli.ScriptArgs, services.GetRequiredService<IMethodRegistry>(), parse.GetValue(Method),
                    device, log, services, directory, cli.Output, ctrlC.Token),
                cli.Error,
                settings.Verbose);
        // MPI wants MPI_Finalize before exit, NCCL its communicator destroyed; a no-op when no group was made.
        try { Distributed.distributed.destroy_process_group(); }
        catch (Distributed.DistributedException e) { cli.Error.WriteLine($"warning: {e.Message}"); }
        launched.ExitCode = result.ExitCode;
        return result.ExitCode;
    }
}
