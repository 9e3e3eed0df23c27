using System.CommandLine;
using System.Reflection;
using LoRAHub.Abstractions;
using LoRAHub.Torch;

namespace LoRAHub.Host.Commands;

/// <summary><c>info</c>: host and contract versions, libtorch version, CUDA build and devices.</summary>
public static class InfoCommand
{
    private const double GiB = 1024.0 * 1024 * 1024;

    public static Command Create(LoRAHubCli cli)
    {
        var command = new Command("info", "Show the libtorch version and CUDA devices");
        command.SetAction((parse, _) => cli.Execute(parse, _ =>
        {
            Write(cli.Output);
            return Task.FromResult(ExitCodes.Ok);
        }));
        return command;
    }

    public static void Write(TextWriter output)
    {
        var version = typeof(InfoCommand).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion;
        output.WriteLine($"loraHub {version} (plugin contract {ContractVersion.Text}, .NET {Environment.Version})");
        output.WriteLine($"libtorch: {torch.__version__}");
        output.WriteLine($"shim built with CUDA: {(torch.cuda.built_with_cuda ? "yes" : "no")}");
        var count = torch.cuda.is_available() ? torch.cuda.device_count() : 0;
        output.WriteLine($"CUDA devices: {count}");
        for (var i = 0; i < count; i++)
        {
            var (name, total, free) = torch.cuda.get_device_properties(i);
            output.WriteLine($"  cuda:{i}  {name}  total {total / GiB:0.0} GiB  free {free / GiB:0.0} GiB");
        }
    }
}
