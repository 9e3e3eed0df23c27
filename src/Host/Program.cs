using LoRAHub.Host;
using LoRAHub.Host.Commands;
using LoRAHub.TorchExtensions;

// Before anything touches TorchSharp: LORAHUB_LIBTORCH (an installed PyTorch's torch/lib) must be loaded first so that
// exactly one libtorch is in the process.
try
{
    TorchRuntime.Initialize();
}
catch (Exception e) when (e is not OutOfMemoryException)
{
    Console.Error.WriteLine($"error: cannot load libtorch: {e.Message}");
    return ExitCodes.UsageError;
}
return await new LoRAHubCli(Console.Out, Console.Error).InvokeAsync(args);
