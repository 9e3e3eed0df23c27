using System.CommandLine;
using System.Reflection;
using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using static TorchSharp.torch;

namespace LoRAHub.Host.Commands;

/// <summary>
/// <c>info</c>: host, contract and TorchSharp versions, then the libtorch and CUDA this process actually loaded (read
/// from the loaded libraries, not TorchSharp's compile-time string), the devices, and whether our kernels are active.
/// </summary>
public static class InfoCommand
{
    public static Command Create(LoRAHubCli cli)
    {
        var command = new Command("info", "Show the libtorch and CUDA actually loaded, the devices, and whether our kernels are active");
        command.SetAction((parse, _) => cli.Execute(parse, _ =>
        {
            Write(cli.Output);
            return Task.FromResult(ExitCodes.Ok);
        }));
        return command;
    }

    public static void Write(TextWriter output)
    {
        var version = Version(typeof(InfoCommand).Assembly);
        output.WriteLine($"loraHub {version} (plugin contract {ContractVersion.Text}, .NET {Environment.Version}, TorchSharp {Version(typeof(Tensor).Assembly)})");
        var runtime = TorchRuntime.Describe();
        var copies = runtime.LibTorchCopies > 1 ? $"; WARNING: {runtime.LibTorchCopies} copies of libtorch are loaded" : "";
        output.WriteLine($"libtorch: {runtime.LibTorchVersion} ({runtime.LibTorchPath}; chosen by {runtime.Source}){copies}");
        output.WriteLine(runtime.CudaRuntimeVersion is null
            ? "CUDA: not available"
            : $"CUDA: runtime {runtime.CudaRuntimeVersion} ({runtime.CudaRuntimePath}), driver {runtime.CudaDriverVersion}");
        output.WriteLine($"CUDA devices: {runtime.Devices.Count}");
        foreach (var device in runtime.Devices) output.WriteLine($"  {device}");
        output.WriteLine($"our CUDA kernels: {runtime.Kernels}");
        output.WriteLine($"CPU threads: {runtime.ThreadsText}");
    }

    private static string? Version(Assembly assembly) =>
        assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion.Split('+')[0];
}
