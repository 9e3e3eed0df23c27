using System.Collections.Concurrent;
using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.Host.Everyday;
using LoRAHub.Models.Generation;
using LoRAHub.Models.Tokenization;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace LoRAHub.Host.Serving;

/// <summary>
/// serve: Kestrel with OpenAI's API shape over one base model and many adapters (as vLLM and LoRAX serve LoRA):
/// GET /v1/models, POST /v1/completions and /v1/chat/completions (with <c>stream: true</c> as server-sent events),
/// and adapter management (GET/POST /v1/adapters, DELETE /v1/adapters/{name}). A request picks the base model or an
/// adapter by its <c>model</c> field; requests that arrive together share one batch (<see cref="InferenceEngine"/>).
/// </summary>
public sealed class OpenAiServer : IAsyncDisposable
{
    private readonly WebApplication app;
    private readonly InferenceEngine engine;
    private readonly LoadedModel model;
    private readonly ServeOptions options;
    // What requests may name, kept here so that routing a request never waits for the worker.
    private readonly ConcurrentDictionary<string, string> adapters = new(StringComparer.Ordinal);
    private readonly long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
    private static readonly JsonSerializerOptions Json = new() { DefaultIgnoreCondition = System.Text.Json.Serialization.JsonIgnoreCondition.Never };

    private OpenAiServer(WebApplication app, InferenceEngine engine, LoadedModel model, ServeOptions options)
    {
        this.app = app;
        this.engine = engine;
        this.model = model;
        this.options = options;
        BaseName = options.BaseName ?? model.Name;
    }

    /// <summary>The id of the base model in /v1/models and in requests.</summary>
    public string BaseName { get; }

    /// <summary>The bound address, e.g. http://127.0.0.1:8000.</summary>
    public string Address { get; private set; } = "";

    public InferenceEngine Engine => engine;

    /// <summary>Starts listening. The hub's registered adapters are served; the server owns neither the model nor the hub.</summary>
    /// <exception cref="IOException">The port is in use; the message names it and says how to pick another.</exception>
    public static async Task<OpenAiServer> StartAsync(LoadedModel model, AdapterHub hub, ServeOptions options, ILoggerFactory loggers)
    {
        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { Args = [] });
        builder.Logging.ClearProviders();
        var quietStartup = new QuietStartupLoggerFactory(loggers);
        builder.Services.AddSingleton<ILoggerFactory>(quietStartup);
        var address = options.ListenAddress();
        builder.WebHost.UseKestrel(k => k.Listen(address, options.Port));
        var app = builder.Build();
        var engine = new InferenceEngine(model, hub, options, loggers.CreateLogger<InferenceEngine>());
        var server = new OpenAiServer(app, engine, model, options);
        foreach (var (name, folder) in hub.Registered) server.adapters[name] = folder;
        server.Map();
        try
        {
            await app.StartAsync();
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            await app.DisposeAsync();
            engine.Dispose();
            if (IsAddressInUse(e))
                throw new IOException($"port {options.Port} on {options.Host} is in use (another serve running?); pass --port with another port, or --port 0 for a free one", e);
            throw;
        }
        quietStartup.Started = true;
        server.Address = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
        return server;
    }

    /// <summary>Kestrel's bind failure: an IOException around AddressInUseException (a SocketException AddressAlreadyInUse).</summary>
    private static bool IsAddressInUse(Exception e)
    {
        for (var x = e; x is not null; x = x.InnerException)
            if (x is Microsoft.AspNetCore.Connections.AddressInUseException
                or System.Net.Sockets.SocketException { SocketErrorCode: System.Net.Sockets.SocketError.AddressAlreadyInUse })
                return true;
        return false;
    }

    /// <summary>
    /// The host's loggers, less the errors that hosting and Kestrel log while the server starts: a failed start (a port
    /// in use) is thrown to the command, which says what to do, instead of a logged stack trace beside it. Once
    /// started, everything is logged as the host's settings say.
    /// </summary>
    private sealed class QuietStartupLoggerFactory(ILoggerFactory inner) : ILoggerFactory
    {
        public volatile bool Started;

        public ILogger CreateLogger(string categoryName) =>
            categoryName.StartsWith("Microsoft.Extensions.Hosting", StringComparison.Ordinal)
            || categoryName.StartsWith("Microsoft.AspNetCore.Hosting", StringComparison.Ordinal)
            || categoryName.StartsWith("Microsoft.AspNetCore.Server.Kestrel", StringComparison.Ordinal)
                ? new QuietStartupLogger(inner.CreateLogger(categoryName), this)
                : inner.CreateLogger(categoryName);

        public void AddProvider(ILoggerProvider provider) => inner.AddProvider(provider);

        // The host's factory belongs to the host; the server only borrows it.
        public void Dispose()
        {
        }
    }

    private sealed class QuietStartupLogger(ILogger inner, QuietStartupLoggerFactory factory) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => inner.BeginScope(state);

        public bool IsEnabled(LogLevel logLevel) => (factory.Started || logLevel < LogLevel.Error) && inner.IsEnabled(logLevel);

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            if (IsEnabled(logLevel)) inner.Log(logLevel, eventId, state, exception, formatter);
        }
    }

    private void Map()
    {
        app.MapGet("/v1/models", () => Results.Json(new { @object = "list", data = Models() }, Json));
        app.MapGet("/v1/models/{id}", (HttpContext context, string id) => Handle(context, () =>
            Models().FirstOrDefault(m => m.id == id) is { } found ? Results.Json(found, Json).ExecuteAsync(context) : throw OpenAiError.ModelNotFound(id)));
        app.MapPost("/v1/completions", context => Handle(context, () => Complete(context, chat: false)));
        app.MapPost("/v1/chat/completions", context => Handle(context, () => Complete(context, chat: true)));
        app.MapGet("/v1/adapters", () => Results.Json(new
        {
            @object = "list",
            data = adapters.OrderBy(a => a.Key, StringComparer.Ordinal)
                .Select(a => new { id = a.Key, path = a.Value, loaded = engine.Loaded.Contains(a.Key) }),
        }, Json));
        app.MapPost("/v1/adapters", context => Handle(context, () => AddAdapter(context)));
        app.MapDelete("/v1/adapters/{name}", (HttpContext context, string name) => Handle(context, () => RemoveAdapter(context, name)));
        // The fallback matches every method, so it, not routing's 405, answers a known route asked with another method.
        app.MapFallback(context =>
        {
            if (AllowedMethods(context.Request.Path) is not { } allowed)
                return WriteError(context, new OpenAiError(404, $"no route {context.Request.Method} {context.Request.Path}", code: "not_found"));
            context.Response.Headers.Allow = allowed;
            return WriteError(context, new OpenAiError(405, $"{context.Request.Method} is not allowed on {context.Request.Path} (allowed: {allowed})", code: "method_not_allowed"));
        });
    }

    /// <summary>The methods of the route a path matches (as routing matches it: any case, a trailing slash or not); null for none.</summary>
    private static string? AllowedMethods(PathString path)
    {
        var segments = (path.Value ?? "").Trim('/').Split('/');
        if (segments.Length < 2 || !segments[0].Equals("v1", StringComparison.OrdinalIgnoreCase)) return null;
        bool Is(int i, string name) => segments[i].Equals(name, StringComparison.OrdinalIgnoreCase);
        return segments.Length switch
        {
            2 when Is(1, "models") => "GET",
            2 when Is(1, "completions") => "POST",
            2 when Is(1, "adapters") => "GET, POST",
            3 when Is(1, "models") && segments[2].Length > 0 => "GET",
            3 when Is(1, "chat") && Is(2, "completions") => "POST",
            3 when Is(1, "adapters") && segments[2].Length > 0 => "DELETE",
            _ => null,
        };
    }

    private sealed record ModelCard(string id, string @object, long created, string owned_by, string root, string? parent);

    private List<ModelCard> Models() =>
        [new(BaseName, "model", created, "lorahub", model.Folder, null),
         .. adapters.OrderBy(a => a.Key, StringComparer.Ordinal).Select(a => new ModelCard(a.Key, "model", created, "lorahub", a.Value, BaseName))];

    private async Task Complete(HttpContext context, bool chat)
    {
        var request = CompletionRequest.Parse(await ReadBody(context), chat, options.MaxTokensLimit);
        string adapter;
        if (request.Model == BaseName) adapter = IAdapterSet.BaseName;
        else if (adapters.ContainsKey(request.Model)) adapter = request.Model;
        else throw OpenAiError.ModelNotFound(request.Model);

        var tokenizer = model.Tokenizer;
        int[] ids;
        try
        {
            ids = request.Prompt.Encode(tokenizer);
        }
        catch (UnencodableTextException e)
        {
            throw OpenAiError.BadRequest(e.Message, chat ? "messages" : "prompt");
        }
        if (ids.Length == 0) throw OpenAiError.BadRequest("the prompt encodes to no tokens", chat ? "messages" : "prompt");
        if ((options.ContextLength ?? model.ContextLength) is int window && ids.Length + request.MaxTokens > window)
            throw OpenAiError.ContextLengthExceeded(window, ids.Length, request.MaxTokens, chat);
        var generation = new GenerationOptions
        {
            MaxNewTokens = request.MaxTokens, Temperature = request.Temperature, TopP = request.TopP, TopK = request.TopK, Seed = request.Seed,
            StopTokenIds = tokenizer.EosTokenId is { } eos ? [eos] : [], PadTokenId = tokenizer.PadTokenId,
        };
        var job = new CompletionJob(ids, generation, adapter, request.Stop, context.RequestAborted);
        engine.Submit(job);
        var id = (chat ? "chatcmpl-" : "cmpl-") + Guid.NewGuid().ToString("N")[..24];
        var kind = chat ? "chat.completion" : "text_completion";
        if (!request.Stream)
        {
            var result = await job.Completion.Task;
            var usage = Usage(result);
            object choice = chat
                ? new { index = 0, message = new { role = "assistant", content = result.Text }, finish_reason = result.FinishReason, logprobs = (object?)null }
                : new { index = 0, text = result.Text, finish_reason = result.FinishReason, logprobs = (object?)null };
            await Results.Json(new { id, @object = kind, created = Now(), model = request.Model, choices = new[] { choice }, usage }, Json).ExecuteAsync(context);
            return;
        }

        var chunkKind = chat ? "chat.completion.chunk" : "text_completion";
        var roleSent = false;
        async Task Send(object? delta, string? text, string? finish)
        {
            if (!context.Response.HasStarted)
            {
                // Headers go with the first chunk: until then a failure (the adapter removed while the request was
                // queued) is answered with its status (404), as a non-streamed request's is.
                context.Response.ContentType = "text/event-stream";
                context.Response.Headers.CacheControl = "no-cache";
            }
            if (chat && !roleSent)
            {
                // Chat's first chunk carries the role; it is sent once generation has produced something (or ended),
                // so never for a request that fails before its batch.
                roleSent = true;
                await Send(new { role = "assistant", content = "" }, null, null);
            }
            object choice = chat
                ? new { index = 0, delta, finish_reason = finish, logprobs = (object?)null }
                : new { index = 0, text = text ?? "", finish_reason = finish, logprobs = (object?)null };
            var chunk = new { id, @object = chunkKind, created = Now(), model = request.Model, choices = new[] { choice } };
            await context.Response.WriteAsync($"data: {JsonSerializer.Serialize(chunk, Json)}\n\n", context.RequestAborted);
            await context.Response.Body.FlushAsync(context.RequestAborted);
        }
        try
        {
            await foreach (var delta in job.Deltas.Reader.ReadAllAsync(context.RequestAborted))
                await Send(chat ? new { content = delta } : null, delta, null);
            var result = await job.Completion.Task;
            await Send(chat ? new { } : null, "", result.FinishReason);
            if (request.IncludeUsage)
            {
                // OpenAI's usage chunk: no choices, the request's token counts.
                var last = new { id, @object = chunkKind, created = Now(), model = request.Model, choices = Array.Empty<object>(), usage = Usage(result) };
                await context.Response.WriteAsync($"data: {JsonSerializer.Serialize(last, Json)}\n\n", context.RequestAborted);
            }
            await context.Response.WriteAsync("data: [DONE]\n\n", context.RequestAborted);
        }
        catch (OperationCanceledException) when (context.RequestAborted.IsCancellationRequested)
        {
            // The client left; the worker sees the same token and finishes the row.
        }
        catch (Exception e) when (e is not OperationCanceledException && context.Response.HasStarted)
        {
            // Headers are sent: report in the stream, as OpenAI's servers do. (Before that, Handle answers with the
            // error's status: 404 for an adapter removed while the request was queued.)
            await context.Response.WriteAsync($"data: {JsonSerializer.Serialize(ServerError(e).Body(), Json)}\n\n");
        }
    }

    private async Task AddAdapter(HttpContext context)
    {
        var body = await ReadBody(context);
        if (body.ValueKind != JsonValueKind.Object) throw OpenAiError.BadRequest("the request body must be a JSON object {\"name\", \"path\"}");
        string Field(string name) => body.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String && v.GetString()!.Length > 0
            ? v.GetString()! : throw OpenAiError.BadRequest($"'{name}' must be a non-empty string", name);
        var name = Field("name");
        var path = Field("path");
        if (name == BaseName) throw OpenAiError.BadRequest($"'{name}' is the base model's name", "name");
        try
        {
            AdapterHub.CheckName(name);
        }
        catch (ArgumentException e)
        {
            throw OpenAiError.BadRequest(e.Message, "name");
        }
        string full;
        try
        {
            // Registered and loaded now, between batches, so that a bad folder is refused here rather than on first use.
            // The served names change in the same action, so that they change in the order the hub's do (a POST and
            // a DELETE of one name sent together end as the worker ran them). An existing name is re-pointed only once
            // the new folder has loaded: on failure it keeps its old folder (reloaded on its next request).
            full = await engine.OnWorker(hub =>
            {
                var old = hub.Registered.TryGetValue(name, out var was) ? was : null;
                hub.Register(name, path);
                try
                {
                    hub.Prepare([name]).Scope?.Dispose();
                }
                catch
                {
                    if (old is null) hub.Remove(name);
                    else
                        try
                        {
                            hub.Register(name, old);
                        }
                        catch
                        {
                            // The old folder is gone too: nothing left to serve under the name.
                            hub.Remove(name);
                            adapters.TryRemove(name, out _);
                        }
                    throw;
                }
                var registered = hub.Registered[name];
                adapters[name] = registered;
                return registered;
            });
        }
        catch (Exception e) when (e is not OutOfMemoryException and not OpenAiError)
        {
            throw OpenAiError.BadRequest($"cannot load adapter '{name}' from {path}: {e.Message}", "path");
        }
        context.Response.StatusCode = 201;
        await context.Response.WriteAsJsonAsync(new ModelCard(name, "model", created, "lorahub", full, BaseName), Json);
    }

    private async Task RemoveAdapter(HttpContext context, string name)
    {
        // Not served now: 404 at once (a POST of it still queued counts as coming after this DELETE).
        if (!adapters.ContainsKey(name)) throw OpenAiError.ModelNotFound(name);
        // Queued requests for it fail with 404 when their batch forms; a running batch finishes first. The served
        // names change on the worker, in the same order as the hub's.
        var known = await engine.OnWorker(hub =>
        {
            var served = adapters.TryRemove(name, out _);
            return hub.Remove(name) || served;
        });
        if (!known) throw OpenAiError.ModelNotFound(name);
        await context.Response.WriteAsJsonAsync(new { id = name, @object = "model", deleted = true }, Json);
    }

    private static async Task<JsonElement> ReadBody(HttpContext context)
    {
        try
        {
            using var document = await JsonDocument.ParseAsync(context.Request.Body, cancellationToken: context.RequestAborted);
            return document.RootElement.Clone();
        }
        catch (JsonException e)
        {
            throw OpenAiError.BadRequest($"the body is not valid JSON: {e.Message}");
        }
    }

    private static async Task Handle(HttpContext context, Func<Task> body)
    {
        try
        {
            await body();
        }
        catch (OpenAiError e)
        {
            await WriteError(context, e);
        }
        catch (BadHttpRequestException e)
        {
            // Kestrel's refusals of the request itself: 413 for a body over the limit, 400 for a malformed one.
            await WriteError(context, new OpenAiError(e.StatusCode, e.Message, code: e.StatusCode == 413 ? "request_too_large" : null));
        }
        catch (KeyNotFoundException e)
        {
            await WriteError(context, new OpenAiError(404, e.Message, "model", "model_not_found"));
        }
        catch (OperationCanceledException) when (context.RequestAborted.IsCancellationRequested)
        {
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            await WriteError(context, ServerError(e));
        }
    }

    /// <summary>
    /// An unexpected failure as OpenAI's server_error, answered or streamed alike: libtorch's errors as typed exceptions
    /// without its C++ backtrace, which means nothing to a client.
    /// </summary>
    private static OpenAiError ServerError(Exception e)
    {
        var error = TorchExtensions.TorchErrors.Translate(e);
        return new OpenAiError(500, $"{error.GetType().Name}: {error.Message}", type: "server_error");
    }

    /// <summary>OpenAI's usage object: the request's prompt and completion tokens.</summary>
    private static object Usage(CompletionResult result) => new
    {
        prompt_tokens = result.PromptTokens, completion_tokens = result.CompletionTokens, total_tokens = result.PromptTokens + result.CompletionTokens,
    };

    private static async Task WriteError(HttpContext context, OpenAiError error)
    {
        if (context.Response.HasStarted) return;
        context.Response.StatusCode = error.Status;
        await context.Response.WriteAsJsonAsync(error.Body(), Json);
    }

    private static long Now() => DateTimeOffset.UtcNow.ToUnixTimeSeconds();

    /// <summary>Runs until the token fires (Ctrl+C in the command).</summary>
    public Task WaitForShutdownAsync(CancellationToken token) => app.WaitForShutdownAsync(token);

    public async ValueTask DisposeAsync()
    {
        await app.StopAsync();
        await app.DisposeAsync();
        engine.Dispose();
    }
}
