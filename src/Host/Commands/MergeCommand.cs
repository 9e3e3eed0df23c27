using System.CommandLine;
using LoRAHub.Host.Everyday;
using LoRAHub.Host.Plugins;
using Microsoft.Extensions.DependencyInjection;

namespace LoRAHub.Host.Commands;

/// <summary><c>merge &lt;base&gt; &lt;adapter&gt; -o &lt;folder&gt;</c>: a thin wrapper over <see cref="AdapterMerge.Run"/>.</summary>
public static class MergeCommand
{
    public static Command Create(LoRAHubCli cli)
    {
        var baseModel = new Argument<string>("base") { Description = "The base model's Hugging Face folder" };
        var adapter = new Argument<string>("adapter") { Description = "A saved adapter folder (its method is found from its files)" };
        var output = new Option<string>("--output", "-o") { Description = "The folder to write the merged model to", Required = true };
        var (device, dtype, json, force) = (CommonOptions.Device(), CommonOptions.DType(), CommonOptions.Json(), CommonOptions.Force());
        var command = new Command("merge", "Fold an adapter into its base model and save an ordinary Hugging Face folder (PEFT's merge_and_unload)")
        {
            baseModel, adapter, output, device, dtype, json, force,
        };
        command.SetAction((parse, _) => cli.Execute(parse, host => cli.Guard(() =>
        {
            var (dev, type) = CommonOptions.Placement(parse, device, dtype);
            var result = AdapterMerge.Run(host.Services.GetRequiredService<IMethodRegistry>(), parse.GetValue(baseModel)!, parse.GetValue(adapter)!,
                parse.GetValue(output)!, dev, type, parse.GetValue(force));
            if (parse.GetValue(json)) CommonOptions.WriteJson(cli.Output, result);
            else cli.Output.WriteLine($"merged {result.Method} adapter into {result.Output} ({result.Parameters:N0} parameters, {result.DType}; {string.Join(", ", result.Files)})");
            return ExitCodes.Ok;
        })));
        return command;
    }
}
