using System.CommandLine;
using LoRAHub.Host.Everyday;
using LoRAHub.Host.Plugins;
using LoRAHub.Models.Generation;
using LoRAHub.Training.Data;
using Microsoft.Extensions.DependencyInjection;

namespace LoRAHub.Host.Commands;

/// <summary><c>eval &lt;model&gt; &lt;data.jsonl&gt; [--adapter folder]</c>: a thin wrapper over <see cref="Evaluation.Run"/>.</summary>
public static class EvalCommand
{
    public static Command Create(LoRAHubCli cli)
    {
        var model = new Argument<string>("model") { Description = "The base model's Hugging Face folder" };
        var data = new Argument<string>("data") { Description = "A JSONL file: text, instruction (Alpaca), prompt/completion or chat (messages) records" };
        var adapter = new Option<string?>("--adapter", "-a") { Description = "A saved adapter folder to evaluate (default: the base model)" };
        var format = new Option<DataFormat>("--format") { Description = "Record format (auto: per record, from its fields)", DefaultValueFactory = _ => DataFormat.Auto };
        var maxLength = new Option<int>("--max-length") { Description = "Records are truncated to this many tokens", DefaultValueFactory = _ => 1024 };
        var batchSize = new Option<int>("--batch-size") { Description = "Records per forward", DefaultValueFactory = _ => 8 };
        var noExact = new Option<bool>("--no-exact-match") { Description = "Loss and perplexity only (no generation)" };
        var maxNew = new Option<int?>("--max-new-tokens") { Description = "Exact match: tokens to generate (default: the answer's length plus one, for eos)" };
        var stops = new Option<string[]>("--stop") { Description = "Exact match: a string that ends the generated answer; repeat for several" };
        var (device, dtype, json) = (CommonOptions.Device(), CommonOptions.DType(), CommonOptions.Json());
        var command = new Command("eval", "Loss, perplexity and exact match of a model (and adapter) on a JSONL set")
        {
            model, data, adapter, format, maxLength, batchSize, noExact, maxNew, stops, device, dtype, json,
        };
        command.SetAction((parse, _) => cli.Execute(parse, host => cli.Guard(() =>
        {
            // Checked before the model loads; --max-new-tokens by generate's (and serve's) rule.
            if (parse.GetValue(maxLength) < 2) throw new ArgumentException($"--max-length must be at least 2 (a token and the next to predict), got {parse.GetValue(maxLength)}");
            if (parse.GetValue(batchSize) < 1) throw new ArgumentException($"--batch-size must be at least 1, got {parse.GetValue(batchSize)}");
            if (parse.GetValue(maxNew) is { } n) new GenerationOptions { MaxNewTokens = n }.Validate(GenerationOptionNames.Cli);
            var (dev, type) = CommonOptions.Placement(parse, device, dtype);
            var result = CommonOptions.WithProgress(cli, "evaluating", progress => Evaluation.Run(
                host.Services.GetRequiredService<IMethodRegistry>(), parse.GetValue(model)!, parse.GetValue(data)!, parse.GetValue(adapter),
                dev, type, parse.GetValue(format), parse.GetValue(maxLength), parse.GetValue(batchSize), !parse.GetValue(noExact),
                parse.GetValue(maxNew), parse.GetValue(stops) ?? [], progress));
            if (parse.GetValue(json)) CommonOptions.WriteJson(cli.Output, result);
            else
            {
                cli.Output.WriteLine($"records: {result.Records}, label tokens: {result.LabelTokens}");
                cli.Output.WriteLine($"loss: {result.Loss:0.0000}, perplexity: {result.Perplexity:0.000}");
                cli.Output.WriteLine(result.ExactMatch is { } em
                    ? $"exact match: {result.ExactMatches}/{result.ExactMatchTotal} ({em:P1})"
                    : "exact match: no record has an answer to compare (text records)");
            }
            return ExitCodes.Ok;
        })));
        return command;
    }
}
