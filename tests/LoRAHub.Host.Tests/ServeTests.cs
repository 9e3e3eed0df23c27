using System.Net;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.Host.Everyday;
using LoRAHub.Host.Serving;
using LoRAHub.Models.Generation;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace LoRAHub.Host.Tests;

/// <summary>
/// serve on loopback with the embedded model and two adapters, driven by a real HTTP client: concurrent streaming and
/// non-streaming requests for both adapters and the base answer exactly what generate gives (greedy) and share batches;
/// bad requests get 4xx with OpenAI's error body; adapters load and unload while requests run; a client that leaves
/// frees its row.
/// </summary>
[Collection(EmbeddedModelCollection.Name)]
public sealed class ServeTests(EmbeddedModelFixture fixture) : IAsyncLifetime
{
    private ServedModel served = null!;
    private LoadedModel model = null!;
    private AdapterHub hub = null!;
    private OpenAiServer server = null!;
    private HttpClient client = null!;

    public async Task InitializeAsync()
    {
        // A generous batch window so that requests sent together surely meet in one batch on a busy 2-core machine.
        // ContextLength past the model's 256 positions: long rows (a client leaving mid-row) without a bigger model.
        served = await ServedModel.StartAsync(fixture, new ServeOptions
        {
            Port = 0, BaseName = "tiny", BatchWait = TimeSpan.FromMilliseconds(300), ContextLength = 8192,
        }, maxLoaded: 2, withAdapters: true);
        (model, hub, server, client) = (served.Model, served.Hub, served.Server, served.Client);
    }

    public async Task DisposeAsync() => await served.DisposeAsync();

    /// <summary>What generate answers (greedy, its own batch) for a prompt with an adapter (null: the base).</summary>
    private string Expected(string? adapter, Prompt prompt, int maxTokens, IReadOnlyList<string>? stops = null)
    {
        using var own = LoadedModel.Load(fixture.BaseModel);
        using var ownHub = new AdapterHub(own.Model, fixture.Methods);
        if (adapter is not null) ownHub.Register(adapter, adapter switch { "a" => fixture.AdapterA, "dora" => fixture.AdapterDora, _ => fixture.AdapterB });
        return Generation.Run(own, ownHub, [prompt], [adapter ?? IAdapterSet.BaseName], new GenerationOptions { MaxNewTokens = maxTokens }, stops)[0].Text;
    }

    private static StringContent Body(object body) => ServedModel.Body(body);

    private async Task<string> Post(string path, object body, bool chat)
    {
        using var response = await client.PostAsync(path, Body(body));
        var text = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.OK, text);
        var choice = JsonDocument.Parse(text).RootElement.GetProperty("choices")[0];
        return chat ? choice.GetProperty("message").GetProperty("content").GetString()! : choice.GetProperty("text").GetString()!;
    }

    private async Task<(string Text, string Finish)> Stream(string path, object body, bool chat)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, path) { Content = Body(body) };
        using var response = await client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType?.MediaType);
        using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
        var text = new StringBuilder();
        string? finish = null;
        var done = false;
        while (await reader.ReadLineAsync() is { } line)
        {
            if (!line.StartsWith("data: ", StringComparison.Ordinal)) continue;
            var data = line["data: ".Length..];
            if (data == "[DONE]") { done = true; break; }
            var choice = JsonDocument.Parse(data).RootElement.GetProperty("choices")[0];
            text.Append(chat ? choice.GetProperty("delta").TryGetProperty("content", out var c) ? c.GetString() : "" : choice.GetProperty("text").GetString());
            if (choice.GetProperty("finish_reason").ValueKind == JsonValueKind.String) finish = choice.GetProperty("finish_reason").GetString();
        }
        Assert.True(done, "the stream ended without data: [DONE]");
        return (text.ToString(), finish!);
    }

    [Fact]
    public async Task Concurrent_requests_for_both_adapters_and_the_base_answer_as_generate_does_and_share_batches()
    {
        // Hold the worker until all twelve requests are queued, so that they surely meet in one batch however slowly
        // a loaded machine delivers them.
        using var gate = new ManualResetEventSlim();
        var held = server.Engine.OnWorker(_ => gate.Wait(TimeSpan.FromSeconds(60)));
        var models = new (string Served, string? Adapter)[] { ("a", "a"), ("b", "b"), ("tiny", null) };
        var calls = new List<Task<(string Name, string Text, string Expected)>>();
        foreach (var (served, adapter) in models)
        {
            var completion = new { model = served, prompt = "copy abcd = ", max_tokens = 10, temperature = 0 };
            var chat = new { model = served, messages = new[] { new { role = "user", content = "the red fox" } }, max_tokens = 10, temperature = 0 };
            var expectedText = Expected(adapter, Prompt.FromText("copy abcd = "), 10);
            var expectedChat = Expected(adapter, Prompt.FromMessages([("user", "the red fox")]), 10);
            calls.Add(Task.Run(async () => ($"{served} completion", await Post("/v1/completions", completion, false), expectedText)));
            calls.Add(Task.Run(async () => ($"{served} chat", await Post("/v1/chat/completions", chat, true), expectedChat)));
            var streamed = new { model = served, prompt = "copy abcd = ", max_tokens = 10, temperature = 0, stream = true };
            calls.Add(Task.Run(async () => ($"{served} streamed completion", (await Stream("/v1/completions", streamed, false)).Text, expectedText)));
            calls.Add(Task.Run(async () => ($"{served} streamed chat", (await Stream("/v1/chat/completions", new { chat.model, chat.messages, chat.max_tokens, chat.temperature, stream = true }, true)).Text, expectedChat)));
        }
        for (var i = 0; i < 600 && server.Engine.Queued < calls.Count; i++) await Task.Delay(50);
        Assert.Equal(calls.Count, server.Engine.Queued);
        gate.Set();
        Assert.True(await held);
        var results = await Task.WhenAll(calls);

        foreach (var (name, text, expected) in results) Assert.True(expected == text, $"{name}: served '{text}', generate gives '{expected}'");
        Assert.NotEqual(results[0].Text, results[8].Text); // adapter a changes the answer
        Assert.Equal(3, server.Engine.MostAdaptersInOneBatch); // a, b and the base in one forward
        Assert.Equal(calls.Count, server.Engine.LargestBatch);
    }

    [Fact]
    public async Task Models_lists_the_base_and_the_adapters()
    {
        var list = await client.GetFromJsonAsync<JsonElement>("/v1/models");

        var ids = list.GetProperty("data").EnumerateArray().Select(m => m.GetProperty("id").GetString()).ToList();
        Assert.Equal(["tiny", "a", "b"], ids);
        Assert.Equal("tiny", list.GetProperty("data")[1].GetProperty("parent").GetString());
    }

    [Theory]
    [InlineData("/v1/completions", "{\"model\": \"a\", \"prompt\": ", 400, null)]                                   // not JSON
    [InlineData("/v1/completions", "[1, 2]", 400, null)]
    [InlineData("/v1/completions", "{\"prompt\": \"x\"}", 400, "model")]
    [InlineData("/v1/completions", "{\"model\": \"nope\", \"prompt\": \"x\"}", 404, "model")]
    [InlineData("/v1/completions", "{\"model\": \"a\"}", 400, "prompt")]
    [InlineData("/v1/completions", "{\"model\": \"a\", \"prompt\": \"x\", \"max_tokens\": 0}", 400, "max_tokens")]
    [InlineData("/v1/completions", "{\"model\": \"a\", \"prompt\": \"x\", \"max_tokens\": \"ten\"}", 400, "max_tokens")]
    [InlineData("/v1/completions", "{\"model\": \"a\", \"prompt\": \"x\", \"n\": 2}", 400, "n")]
    [InlineData("/v1/completions", "{\"model\": \"a\", \"prompt\": \"x\", \"temperature\": 7}", 400, "temperature")]
    [InlineData("/v1/completions", "{\"model\": \"a\", \"prompt\": \"x\", \"stop\": 3}", 400, "stop")]
    [InlineData("/v1/completions", "{\"model\": \"a\", \"prompt\": \"x\", \"top_p\": 2}", 400, "top_p")]
    [InlineData("/v1/completions", "{\"model\": \"a\", \"prompt\": \"x\", \"top_k\": -3}", 400, "top_k")]
    [InlineData("/v1/completions", "{\"model\": \"a\", \"prompt\": \"copy Abcd\"}", 400, "prompt")]                          // 'A' is not in the vocabulary
    [InlineData("/v1/chat/completions", "{\"model\": \"a\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}", 400, "messages")]
    [InlineData("/v1/chat/completions", "{\"model\": \"a\", \"messages\": []}", 400, "messages")]
    [InlineData("/v1/chat/completions", "{\"model\": \"a\", \"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}]}", 400, "messages")]
    [InlineData("/v1/adapters", "{\"name\": \"c\", \"path\": \"/no/such/folder\"}", 400, "path")]
    [InlineData("/v1/adapters", "{\"name\": \"bad name!\", \"path\": \"/tmp\"}", 400, "name")]
    [InlineData("/v1/nothing", "{}", 404, null)]
    public async Task Malformed_requests_get_4xx_with_an_openai_error_body(string path, string body, int status, string? param)
    {
        using var response = await client.PostAsync(path, new StringContent(body, Encoding.UTF8, "application/json"));

        var text = await response.Content.ReadAsStringAsync();
        Assert.True((int)response.StatusCode == status, $"{(int)response.StatusCode}: {text}");
        var error = JsonDocument.Parse(text).RootElement.GetProperty("error");
        Assert.False(string.IsNullOrWhiteSpace(error.GetProperty("message").GetString()));
        Assert.Equal(param, error.GetProperty("param").GetString());
        if (status == 400) Assert.Equal("invalid_request_error", error.GetProperty("type").GetString());
    }

    [Theory]
    [InlineData("{\"model\": \"a\", \"prompt\": \"x\", \"top_p\": 2}", "top_p must be in (0, 1] (1: off), got 2")]
    [InlineData("{\"model\": \"a\", \"prompt\": \"x\", \"max_tokens\": 5000}", "max_tokens must be between 1 and 4096, got 5000")]
    [InlineData("{\"model\": \"a\", \"prompt\": \"copy Abcd\"}", "the text has 'A' (U+0041) at position 5, which this model's vocabulary cannot encode")]
    public async Task Refusals_say_what_generate_says_for_the_same_values(string body, string message)
    {
        using var response = await client.PostAsync("/v1/completions", new StringContent(body, Encoding.UTF8, "application/json"));

        var error = JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement.GetProperty("error");
        Assert.Equal(HttpStatusCode.BadRequest, response.StatusCode);
        Assert.StartsWith(message, error.GetProperty("message").GetString());
    }

    [Fact]
    public async Task A_port_in_use_is_an_IOException_that_says_so_with_no_hosting_error_logged()
    {
        var port = new Uri(server.Address).Port; // this class's server holds it
        var logs = new CapturedLogs();
        using var loggers = LoggerFactory.Create(b => b.AddProvider(logs).SetMinimumLevel(LogLevel.Trace));

        var e = await Assert.ThrowsAsync<IOException>(() => OpenAiServer.StartAsync(model, hub, new ServeOptions { Port = port }, loggers));

        Assert.Equal($"port {port} on 127.0.0.1 is in use (another serve running?); pass --port with another port, or --port 0 for a free one", e.Message);
        Assert.DoesNotContain(logs.Entries, l => l.Level >= LogLevel.Error);
    }

    private sealed class CapturedLogs : ILoggerProvider
    {
        public System.Collections.Concurrent.ConcurrentQueue<(string Category, LogLevel Level, string Message)> Entries { get; } = new();

        public ILogger CreateLogger(string categoryName) => new Logger(this, categoryName);

        public void Dispose()
        {
        }

        private sealed class Logger(CapturedLogs owner, string category) : ILogger
        {
            public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

            public bool IsEnabled(LogLevel logLevel) => true;

            public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
                owner.Entries.Enqueue((category, logLevel, formatter(state, exception)));
        }
    }

    [Fact]
    public async Task A_dora_adapter_added_after_lora_ones_answers_as_alone_beside_them()
    {
        await Post("/v1/completions", new { model = "a", prompt = "x", max_tokens = 2 }, false); // a LoRA adapter owns the set

        using (var added = await client.PostAsync("/v1/adapters", Body(new { name = "dora", path = fixture.AdapterDora })))
            Assert.True(added.StatusCode == HttpStatusCode.Created, await added.Content.ReadAsStringAsync());
        // Sent together, the LoRA and DoRA rows share a batch; each answers as it does alone.
        var viaDora = Post("/v1/completions", new { model = "dora", prompt = "copy abcd = ", max_tokens = 10, temperature = 0 }, false);
        var viaA = Post("/v1/completions", new { model = "a", prompt = "copy abcd = ", max_tokens = 10, temperature = 0 }, false);
        Assert.Equal(Expected("dora", Prompt.FromText("copy abcd = "), 10), await viaDora);
        Assert.Equal(Expected("a", Prompt.FromText("copy abcd = "), 10), await viaA);
        Assert.NotEqual(await viaA, await viaDora);
        Assert.Contains("dora", server.Engine.Loaded);

        using (var removed = await client.DeleteAsync("/v1/adapters/dora"))
            Assert.Equal(HttpStatusCode.OK, removed.StatusCode);
        Assert.Equal(Expected("a", Prompt.FromText("copy abcd = "), 10),
            await Post("/v1/completions", new { model = "a", prompt = "copy abcd = ", max_tokens = 10, temperature = 0 }, false));
    }

    [Fact]
    public async Task Adapters_load_and_unload_while_requests_run_within_the_loaded_cap()
    {
        // A long streamed request keeps a batch busy while the adapter set changes.
        var running = Stream("/v1/completions", new { model = "a", prompt = "the red fox", max_tokens = 120, temperature = 0, stream = true }, false);

        using (var added = await client.PostAsync("/v1/adapters", Body(new { name = "c", path = fixture.AdapterB })))
            Assert.True(added.StatusCode == HttpStatusCode.Created, await added.Content.ReadAsStringAsync());
        using (var removed = await client.DeleteAsync("/v1/adapters/b"))
            Assert.Equal(HttpStatusCode.OK, removed.StatusCode);

        var viaC = await Post("/v1/completions", new { model = "c", prompt = "copy abcd = ", max_tokens = 10, temperature = 0 }, false);
        Assert.Equal(Expected("b", Prompt.FromText("copy abcd = "), 10), viaC); // c is b's folder under another name
        using (var gone = await client.PostAsync("/v1/completions", Body(new { model = "b", prompt = "x" })))
            Assert.Equal(HttpStatusCode.NotFound, gone.StatusCode);
        using (var again = await client.DeleteAsync("/v1/adapters/b"))
            Assert.Equal(HttpStatusCode.NotFound, again.StatusCode);

        var (text, finish) = await running;
        Assert.Equal(Expected("a", Prompt.FromText("the red fox"), 120), text);
        Assert.Equal("length", finish);
        // A third adapter with two allowed in memory: the least recently used one (c) goes; a request for it reloads it.
        await Post("/v1/completions", new { model = "a", prompt = "x", max_tokens = 2 }, false);
        using (var added = await client.PostAsync("/v1/adapters", Body(new { name = "d", path = fixture.AdapterA })))
            Assert.True(added.StatusCode == HttpStatusCode.Created, await added.Content.ReadAsStringAsync());
        Assert.Equal(["d", "a"], server.Engine.Loaded);
        Assert.Equal(viaC, await Post("/v1/completions", new { model = "c", prompt = "copy abcd = ", max_tokens = 10, temperature = 0 }, false));
        Assert.Equal(["c", "d"], server.Engine.Loaded);
        var adapters = await client.GetFromJsonAsync<JsonElement>("/v1/adapters");
        Assert.Equal(["a", "c", "d"], adapters.GetProperty("data").EnumerateArray().Select(a => a.GetProperty("id").GetString()));
    }

    [Fact]
    public async Task A_client_that_disconnects_frees_its_row()
    {
        using var cancel = new CancellationTokenSource();
        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/completions")
        {
            Content = Body(new { model = "b", prompt = "the red fox", max_tokens = 4000, temperature = 0, stream = true }),
        };
        var response = await client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, cancel.Token);
        var reader = new StreamReader(await response.Content.ReadAsStreamAsync(cancel.Token));
        while (await reader.ReadLineAsync(cancel.Token) is { } line && !line.StartsWith("data: ", StringComparison.Ordinal)) { }
        var before = server.Engine.RowsCancelled;
        cancel.Cancel();
        response.Dispose();

        // The row ends at the next step instead of decoding 4000 tokens; the next request is served.
        for (var i = 0; i < 200 && server.Engine.RowsCancelled == before; i++) await Task.Delay(50);
        Assert.Equal(before + 1, server.Engine.RowsCancelled);
        Assert.Equal(Expected(null, Prompt.FromText("copy abcd = "), 5), await Post("/v1/completions", new { model = "tiny", prompt = "copy abcd = ", max_tokens = 5, temperature = 0 }, false));
    }
}
