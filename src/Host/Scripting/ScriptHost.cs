using LoRAHub.Abstractions;
using LoRAHub.Host.Plugins;
using Microsoft.Extensions.Logging;
using static TorchSharp.torch;

namespace LoRAHub.Host.Scripting;

/// <summary>The globals of a `.csx` script: its members are visible in the script without qualification.</summary>
public class ScriptHost(
    IReadOnlyList<string> args,
    IMethodRegistry methods,
    string? methodName,
    Device device,
    ILogger log,
    IServiceProvider services,
    string scriptDirectory,
    TextWriter output,
    CancellationToken cancellation = default)
{
    /// <summary>The arguments after the script path on the command line.</summary>
    public string[] Args { get; } = args.ToArray();

    public IMethodRegistry Methods { get; } = methods;

    /// <summary>The value of <c>--method</c>, or null when it was not given.</summary>
    public string? MethodName { get; } = methodName;

    /// <summary>The value of <c>--device</c>; by default cuda when available, else cpu.</summary>
    public Device Device { get; } = device;

    public ILogger Log { get; } = log;

    public IServiceProvider Services { get; } = services;

    /// <summary>
    /// Cancelled by the first Ctrl+C of `loraHub run` (a second ends the process). <c>Trainer.Train</c> follows it when
    /// given no token of its own (it saves a checkpoint and stops after the step); check it in long loops of your own.
    /// </summary>
    public CancellationToken Cancellation { get; } = cancellation;

    /// <summary>The folder of the script file, for paths relative to the script.</summary>
    public string ScriptDirectory { get; } = scriptDirectory;

    /// <summary>The adaptation method with this (case-insensitive) name.</summary>
    public IAdapterMethod Method(string name) => Methods.Get(name);

    /// <summary>Loads a saved adapter folder with the one method that claims it (PEFT's from_pretrained picks it the same way).</summary>
    public IAdapter LoadAdapter(IAdaptableModel model, string directory) => Methods.ForFolder(directory).Load(model, directory);

    /// <summary>Writes a user-facing line to standard output (logs go to standard error).</summary>
    public void Output(string line) => output.WriteLine(line);
}
