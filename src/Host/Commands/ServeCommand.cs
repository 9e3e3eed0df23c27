using System.CommandLine;
using LoRAHub.Host.Everyday;
using LoRAHub.Host.Plugins;
using LoRAHub.Host.Serving;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace LoRAHub.Host.Commands;

/// <summary><c>serve &lt;model&gt; [--adapter name=folder]...</c>: an OpenAI-shaped server (<see cref="OpenAiServer"/>) until Ctrl+C.</summary>
public static class ServeCommand
{
    public static Command Create(LoRAHubCli cli)
    {
        var model = new Argument<string>("model") { Description = "The base model's Hugging Face folder" };
        var adapters = new Option<string[]>("--adapter", "-a") { Description = "An adapter to serve, as name=folder (or a folder, named after it); repeat for several; more can be added at run time (POST /v1/adapters)" };
        var host = new Option<string>("--host") { Description = "The address to listen on (default loopback; 0.0.0.0 exposes the server to the network)", DefaultValueFactory = _ => "127.0.0.1" };
        var port = new Option<int>("--port") { Description = "The port (0 picks a free one)", DefaultValueFactory = _ => 8000 };
        var name = new Option<string?>("--name") { Description = "The id of the base model in requests (default: its folder's name)" };
        var maxBatch = new Option<int>("--max-batch-size") { Description = "Requests decoded together at most", DefaultValueFactory = _ => 16 };
        var maxLoaded = new Option<int>("--max-loaded-adapters") { Description = "Adapters kept in memory; the least recently used are evicted and reloaded on demand", DefaultValueFactory = _ => 8 };
        var wait = new Option<int>("--batch-wait-ms") { Description = "How long to wait after a request for others to join its batch", DefaultValueFactory = _ => 10 };
        var maxModelLen = new Option<int?>("--max-model-len") { Description = "Prompt and completion tokens a request may take together (default: the model's max_position_embeddings; vLLM's option)" };
        var (device, dtype) = (CommonOptions.Device(), CommonOptions.DType());
        var command = new Command("serve", "Serve the base model and its adapters over HTTP with OpenAI's API (completions, chat, streaming)")
        {
            model, adapters, host, port, name, maxBatch, maxLoaded, wait, maxModelLen, device, dtype,
        };
        command.SetAction((parse, cancellation) => cli.Execute(parse, async services =>
        {
            ServeOptions options;
            LoadedModel loaded;
            AdapterHub hub;
            try
            {
                options = new ServeOptions
                {
                    Host = parse.GetValue(host)!, Port = parse.GetValue(port), BaseName = parse.GetValue(name),
                    MaxBatchSize = Positive(parse.GetValue(maxBatch), "--max-batch-size"),
                    MaxLoadedAdapters = Positive(parse.GetValue(maxLoaded), "--max-loaded-adapters"),
                    BatchWait = TimeSpan.FromMilliseconds(Math.Max(0, parse.GetValue(wait))),
                    ContextLength = parse.GetValue(maxModelLen) is int len ? Positive(len, "--max-model-len") : null,
                };
                options.ListenAddress();
                if (options.Port is < 0 or > 65535) throw new ArgumentException($"--port {options.Port} is not a TCP port (0 to 65535)");
                var (dev, type) = CommonOptions.Placement(parse, device, dtype);
                loaded = LoadedModel.Load(parse.GetValue(model)!, dev, type);
                hub = new AdapterHub(loaded.Model, services.Services.GetRequiredService<IMethodRegistry>(), options.MaxLoadedAdapters);
                foreach (var spec in parse.GetValue(adapters) ?? [])
                {
                    var (adapterName, folder) = GenerateCommand.ParseAdapter(spec);
                    // Requests naming it would get the base model: refused, as POST /v1/adapters refuses it.
                    if (adapterName == (options.BaseName ?? loaded.Name))
                        throw new ArgumentException($"--adapter {spec}: '{adapterName}' is the base model's name; name the adapter otherwise (name=folder) or the base model with --name");
                    hub.Register(adapterName, folder);
                }
            }
            catch (Exception e) when (e is ArgumentException or FileNotFoundException or DirectoryNotFoundException)
            {
                cli.Error.WriteLine($"error: {e.Message}");
                return ExitCodes.UsageError;
            }
            using (loaded)
            using (hub)
            {
                OpenAiServer started;
                try
                {
                    started = await OpenAiServer.StartAsync(loaded, hub, options, services.Services.GetRequiredService<ILoggerFactory>());
                }
                catch (IOException e)
                {
                    // The port in use: fixed by another --port, as the other bad options are.
                    cli.Error.WriteLine($"error: {e.Message}");
                    return ExitCodes.UsageError;
                }
                await using var server = started;
                cli.Output.WriteLine($"serving {server.BaseName} and {hub.Registered.Count} adapters on {server.Address} (OpenAI API: {server.Address}/v1); Ctrl+C stops");
                await cli.Output.FlushAsync(CancellationToken.None);
                // Ends on Ctrl+C or SIGTERM (ASP.NET Core's console lifetime stops the server) or when the CLI is cancelled.
                await server.WaitForShutdownAsync(cancellation);
            }
            return ExitCodes.Ok;
        }));
        return command;
    }

    private static int Positive(int value, string option) => value >= 1 ? value : throw new ArgumentException($"{option} must be at least 1");
}
