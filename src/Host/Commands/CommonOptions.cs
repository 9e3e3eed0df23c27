using System.CommandLine;
using System.Text.Json;
using LoRAHub.Host.Everyday;
using Spectre.Console;
using static TorchSharp.torch;

namespace LoRAHub.Host.Commands;

/// <summary>Options the everyday commands share (device, dtype, JSON output) and how their results are printed.</summary>
public static class CommonOptions
{
    public static Option<string?> Device() => new("--device") { Description = "cpu, cuda or cuda:N (default: cuda when available, else cpu)" };

    public static Option<string?> DType() => new("--dtype") { Description = "float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on the CPU)" };

    public static Option<bool> Json() => new("--json") { Description = "Write the result as JSON on standard output" };

    public static Option<bool> Force() => new("--force") { Description = "Write into a folder that already has files" };

    public static readonly JsonSerializerOptions JsonOptions = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        WriteIndented = true,
        NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals,
    };

    public static void WriteJson<T>(TextWriter output, T value) => output.WriteLine(JsonSerializer.Serialize(value, JsonOptions));

    /// <exception cref="ArgumentException">A bad device or dtype (reported as a usage error).</exception>
    public static (Device Device, ScalarType? DType) Placement(ParseResult parse, Option<string?> device, Option<string?> dtype) =>
        (parse.GetValue(device) is { } d ? HostDevice.Parse(d) : HostDevice.Default(),
         parse.GetValue(dtype) is { } t ? LoadedModel.ParseDType(t) : null);

    /// <summary>
    /// Runs work that reports (done, total) with a Spectre.Console progress bar on standard error when that is a
    /// terminal and the CLI writes to the real console; otherwise silently (pipes, tests, --json).
    /// </summary>
    public static T WithProgress<T>(LoRAHubCli cli, string description, Func<Action<int, int>?, T> work)
    {
        if (!ReferenceEquals(cli.Error, Console.Error) || Console.IsErrorRedirected) return work(null);
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(Console.Error) });
        return console.Progress().AutoClear(true).Start(context =>
        {
            var task = context.AddTask(description, autoStart: true, maxValue: 1);
            return work((done, total) =>
            {
                task.MaxValue = Math.Max(1, total);
                task.Value = done;
            });
        });
    }
}
