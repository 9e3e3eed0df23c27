using System.CommandLine;
using LoRAHub.Abstractions;
using LoRAHub.Host.Everyday;
using LoRAHub.Host.Plugins;
using LoRAHub.Models.Generation;
using LoRAHub.Models.Tokenization;
using Microsoft.Extensions.DependencyInjection;

namespace LoRAHub.Host.Commands;

/// <summary>
/// <c>generate &lt;model&gt; --prompt ... [--adapter [name=]folder]...</c>: a thin wrapper over <see cref="Generation.Run"/>.
/// Several adapters (and <c>--base</c>) answer every prompt in one batch with a per-row adapter.
/// </summary>
public static class GenerateCommand
{
    public static Command Create(LoRAHubCli cli)
    {
        var model = new Argument<string>("model") { Description = "The base model's Hugging Face folder" };
        var adapters = new Option<string[]>("--adapter", "-a") { Description = "An adapter folder, or name=folder; repeat for several (one batch, a row per adapter and prompt)", AllowMultipleArgumentsPerToken = false };
        var withBase = new Option<bool>("--base") { Description = "Also answer with the base model alone (with --adapter)" };
        var prompts = new Option<string[]>("--prompt", "-p") { Description = "A text prompt; repeat for several" };
        var chats = new Option<string[]>("--chat") { Description = "A user message, rendered with the tokenizer's chat template; repeat for several conversations" };
        var system = new Option<string?>("--system") { Description = "A system message put before each --chat" };
        var maxNew = new Option<int>("--max-new-tokens") { Description = "Tokens to generate at most", DefaultValueFactory = _ => 64 };
        var temperature = new Option<double>("--temperature") { Description = "0 for greedy decoding", DefaultValueFactory = _ => 0 };
        var topK = new Option<int>("--top-k") { Description = "Sample from the k most likely tokens (0: off)" };
        var topP = new Option<double>("--top-p") { Description = "Nucleus sampling (1: off)", DefaultValueFactory = _ => 1.0 };
        var seed = new Option<int>("--seed") { Description = "Seed of each row's sampler" };
        var stops = new Option<string[]>("--stop") { Description = "A string that ends the answer (not included); repeat for several" };
        var (device, dtype, json) = (CommonOptions.Device(), CommonOptions.DType(), CommonOptions.Json());
        var command = new Command("generate", "Generate from prompts or chat messages with the base model and any number of adapters")
        {
            model, adapters, withBase, prompts, chats, system, maxNew, temperature, topK, topP, seed, stops, device, dtype, json,
        };
        command.SetAction((parse, _) => cli.Execute(parse, host => cli.Guard(() =>
        {
            var all = (parse.GetValue(prompts) ?? []).Select(Prompt.FromText)
                .Concat((parse.GetValue(chats) ?? []).Select(message => Prompt.FromMessages(
                    parse.GetValue(system) is { } s ? [("system", s), ("user", message)] : [("user", message)])))
                .ToList();
            if (all.Count == 0) throw new ArgumentException("give a prompt: --prompt \"text\" or --chat \"message\"");
            var specs = parse.GetValue(adapters) ?? [];
            var options = new GenerationOptions
            {
                MaxNewTokens = parse.GetValue(maxNew), Temperature = parse.GetValue(temperature), TopK = parse.GetValue(topK),
                TopP = parse.GetValue(topP), Seed = parse.GetValue(seed),
            };
            // Checked before the model loads, by the rule serve's requests follow too.
            options.Validate(GenerationOptionNames.Cli);
            var (dev, type) = CommonOptions.Placement(parse, device, dtype);
            using var loaded = LoadedModel.Load(parse.GetValue(model)!, dev, type);
            if (all.Any(p => p.Messages is not null) && ChatTemplateNote(loaded) is { } note) cli.Error.WriteLine(note);
            using var hub = new AdapterHub(loaded.Model, host.Services.GetRequiredService<IMethodRegistry>(), maxLoaded: int.MaxValue,
                allowBaseRewrites: true); // each such adapter runs after the base and the others (Generation.Run)
            var names = new List<string>();
            foreach (var spec in specs)
            {
                var (name, folder) = ParseAdapter(spec);
                if (names.Contains(name)) throw new ArgumentException($"two adapters are named '{name}'; name them: --adapter a={folder}");
                hub.Register(name, folder);
                names.Add(name);
            }
            if (names.Count > 0 && parse.GetValue(withBase)) names.Add(IAdapterSet.BaseName);
            var results = Generation.Run(loaded, hub, all, names, options, parse.GetValue(stops) ?? []);
            if (parse.GetValue(json)) CommonOptions.WriteJson(cli.Output, results);
            else if (results.Count == 1) cli.Output.WriteLine(results[0].Text);
            else
                foreach (var r in results)
                {
                    cli.Output.WriteLine($"--- {(r.Adapter == IAdapterSet.BaseName ? loaded.Name : r.Adapter)}: {r.Prompt.ReplaceLineEndings(" ")}");
                    cli.Output.WriteLine(r.Text);
                }
            return ExitCodes.Ok;
        })));
        return command;
    }

    /// <summary>
    /// A note for --chat when the tokenizer brings no chat template we render (none in tokenizer_config.json, or one
    /// of a format we do not know): the conversation is rendered as plain "role: content" lines, which the model may
    /// not have been trained on. Null when the model has a template.
    /// </summary>
    public static string? ChatTemplateNote(LoadedModel loaded) => loaded.Tokenizer.ChatTemplate.Name != "plain" ? null
        : loaded.Tokenizer.HasChatTemplate
            ? $"note: {loaded.Name}'s chat template is none of the formats LoRAHub renders ({string.Join(", ", ChatTemplate.Names.Where(n => n != "plain"))}); --chat uses plain 'role: content' lines ending in 'assistant:'"
            : $"note: {loaded.Name} has no chat template (no chat_template in tokenizer_config.json); --chat uses plain 'role: content' lines ending in 'assistant:'";

    /// <summary>"name=folder", or a folder named by its last path segment.</summary>
    public static (string Name, string Folder) ParseAdapter(string spec)
    {
        var eq = spec.IndexOf('=');
        if (eq > 0 && !Directory.Exists(spec)) return (spec[..eq], spec[(eq + 1)..]);
        return (Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(spec))), spec);
    }
}
