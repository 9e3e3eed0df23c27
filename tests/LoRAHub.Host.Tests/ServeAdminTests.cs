using System.Net;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using LoRAHub.Host.Everyday;
using LoRAHub.Host.Serving;
using Microsoft.Extensions.Logging.Abstractions;

namespace LoRAHub.Host.Tests;

/// <summary>
/// serve's adapter management and its edges: a failed re-registration keeps the working adapter; a POST and a DELETE
/// of one name end as the worker applied them (no adapter listed but unreachable); a streamed request whose adapter
/// is removed while it is queued gets the 404 a non-streamed one gets; a known route with another method is 405; a body
/// over the limit is 413; the CLI refuses an adapter named as the base model.
/// </summary>
[Collection(EmbeddedModelCollection.Name)]
public sealed class ServeAdminTests(EmbeddedModelFixture fixture) : IAsyncLifetime
{
    private ServedModel served = null!;
    private AdapterHub hub = null!;
    private OpenAiServer server = null!;
    private HttpClient client = null!;

    public async Task InitializeAsync()
    {
        served = await ServedModel.StartAsync(fixture, new ServeOptions { Port = 0, BaseName = "tiny", BatchWait = TimeSpan.FromMilliseconds(50) },
            maxLoaded: 2, withAdapters: true);
        (hub, server, client) = (served.Hub, served.Server, served.Client);
    }

    public async Task DisposeAsync() => await served.DisposeAsync();

    private static StringContent Body(object body) => ServedModel.Body(body);

    private async Task<(HttpStatusCode Status, JsonElement Body)> Call(HttpMethod method, string path, object? body = null)
    {
        using var request = new HttpRequestMessage(method, path) { Content = body is null ? null : Body(body) };
        using var response = await client.SendAsync(request);
        var text = await response.Content.ReadAsStringAsync();
        return (response.StatusCode, text.Length == 0 ? default : JsonDocument.Parse(text).RootElement.Clone());
    }

    private async Task<string> Complete(string adapter)
    {
        var (status, body) = await Call(HttpMethod.Post, "/v1/completions", new { model = adapter, prompt = "copy abcd = ", max_tokens = 8, temperature = 0 });
        Assert.True(status == HttpStatusCode.OK, body.ToString());
        return body.GetProperty("choices")[0].GetProperty("text").GetString()!;
    }

    private async Task<List<string>> Listed(string path)
    {
        var list = await client.GetFromJsonAsync<JsonElement>(path);
        return [.. list.GetProperty("data").EnumerateArray().Select(m => m.GetProperty("id").GetString()!)];
    }

    /// <summary>An adapter folder with a's config and a weights file that is not safetensors: registers, fails to load.</summary>
    private string BadAdapter()
    {
        var folder = fixture.Temp.Combine("bad-adapters", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(folder);
        foreach (var file in Directory.GetFiles(fixture.AdapterA))
        {
            var target = Path.Combine(folder, Path.GetFileName(file));
            if (file.EndsWith(".safetensors", StringComparison.Ordinal)) File.WriteAllText(target, "this is not a safetensors file");
            else File.Copy(file, target);
        }
        return folder;
    }

    [Fact]
    public async Task A_failed_re_registration_keeps_the_working_adapter()
    {
        var before = await Complete("a");

        var (status, body) = await Call(HttpMethod.Post, "/v1/adapters", new { name = "a", path = BadAdapter() });

        Assert.True(status == HttpStatusCode.BadRequest, body.ToString());
        Assert.Equal("path", body.GetProperty("error").GetProperty("param").GetString());
        Assert.Equal(before, await Complete("a"));
        var adapters = await client.GetFromJsonAsync<JsonElement>("/v1/adapters");
        var a = adapters.GetProperty("data").EnumerateArray().Single(x => x.GetProperty("id").GetString() == "a");
        Assert.Equal(Path.GetFullPath(fixture.AdapterA), a.GetProperty("path").GetString());
        Assert.Contains("a", await Listed("/v1/models"));
    }

    [Fact]
    public async Task A_failed_registration_of_a_new_name_leaves_nothing_behind()
    {
        var (status, _) = await Call(HttpMethod.Post, "/v1/adapters", new { name = "c", path = BadAdapter() });

        Assert.Equal(HttpStatusCode.BadRequest, status);
        Assert.Equal(["tiny", "a", "b"], await Listed("/v1/models"));
        Assert.DoesNotContain("c", hub.Registered.Keys);
    }

    [Fact]
    public async Task A_successful_re_registration_re_points_the_name()
    {
        var viaB = await Complete("b");

        var (status, body) = await Call(HttpMethod.Post, "/v1/adapters", new { name = "a", path = fixture.AdapterB });

        Assert.True(status == HttpStatusCode.Created, body.ToString());
        Assert.Equal(viaB, await Complete("a"));
    }

    [Fact]
    public async Task A_post_and_a_delete_of_one_name_end_in_the_order_the_worker_ran_them()
    {
        // Hold the worker so that the POST's change queues first and the DELETE's second.
        using var gate = new ManualResetEventSlim();
        var held = server.Engine.OnWorker(_ => gate.Wait(TimeSpan.FromSeconds(60)));
        var post = Call(HttpMethod.Post, "/v1/adapters", new { name = "a", path = fixture.AdapterA });
        await Task.Delay(1000); // the POST is read and its change queued
        var delete = Call(HttpMethod.Delete, "/v1/adapters/a");
        await Task.Delay(500);
        gate.Set();
        Assert.True(await held);

        Assert.Equal(HttpStatusCode.Created, (await post).Status);
        Assert.Equal(HttpStatusCode.OK, (await delete).Status);
        // Removed last, so gone everywhere: not listed, and 404 when asked for.
        Assert.DoesNotContain("a", await Listed("/v1/adapters"));
        Assert.DoesNotContain("a", await Listed("/v1/models"));
        var (status, _) = await Call(HttpMethod.Post, "/v1/completions", new { model = "a", prompt = "x", max_tokens = 2 });
        Assert.Equal(HttpStatusCode.NotFound, status);
    }

    [Fact]
    public async Task A_delete_of_an_unknown_adapter_is_404()
    {
        var (status, body) = await Call(HttpMethod.Delete, "/v1/adapters/nope");

        Assert.Equal(HttpStatusCode.NotFound, status);
        Assert.Equal("model_not_found", body.GetProperty("error").GetProperty("code").GetString());
    }

    [Theory]
    [InlineData("/v1/completions", false)]
    [InlineData("/v1/chat/completions", true)]
    public async Task A_streamed_request_whose_adapter_is_removed_while_queued_gets_404(string path, bool chat)
    {
        using var gate = new ManualResetEventSlim();
        var held = server.Engine.OnWorker(_ => gate.Wait(TimeSpan.FromSeconds(60)));
        object body = chat
            ? new { model = "b", messages = new[] { new { role = "user", content = "the red fox" } }, max_tokens = 5, stream = true }
            : new { model = "b", prompt = "the red fox", max_tokens = 5, stream = true };
        using var request = new HttpRequestMessage(HttpMethod.Post, path) { Content = Body(body) };
        var sent = client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        for (var i = 0; i < 600 && server.Engine.Queued < 1; i++) await Task.Delay(50);
        Assert.Equal(1, server.Engine.Queued);
        var delete = Call(HttpMethod.Delete, "/v1/adapters/b");
        await Task.Delay(300);
        gate.Set();
        Assert.True(await held);
        Assert.Equal(HttpStatusCode.OK, (await delete).Status);

        using var response = await sent;
        var text = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.NotFound, $"{(int)response.StatusCode}: {text}");
        Assert.Equal("application/json", response.Content.Headers.ContentType?.MediaType);
        Assert.Equal("model_not_found", JsonDocument.Parse(text).RootElement.GetProperty("error").GetProperty("code").GetString());
    }

    [Fact]
    public async Task A_streamed_chat_still_starts_with_the_role_chunk_and_ends_with_done()
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions")
        {
            Content = Body(new { model = "a", messages = new[] { new { role = "user", content = "the red fox" } }, max_tokens = 6, temperature = 0, stream = true }),
        };
        using var response = await client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType?.MediaType);
        var events = (await response.Content.ReadAsStringAsync()).Split('\n').Where(l => l.StartsWith("data: ", StringComparison.Ordinal)).Select(l => l[6..]).ToList();

        Assert.Equal("[DONE]", events[^1]);
        var first = JsonDocument.Parse(events[0]).RootElement.GetProperty("choices")[0].GetProperty("delta");
        Assert.Equal("assistant", first.GetProperty("role").GetString());
        Assert.Single(events, e => e.Contains("\"role\"", StringComparison.Ordinal));
        var last = JsonDocument.Parse(events[^2]).RootElement.GetProperty("choices")[0];
        Assert.Equal("length", last.GetProperty("finish_reason").GetString());
    }

    [Theory]
    [InlineData("GET", "/v1/completions", "POST")]
    [InlineData("GET", "/v1/chat/completions", "POST")]
    [InlineData("DELETE", "/v1/models", "GET")]
    [InlineData("POST", "/v1/models/tiny", "GET")]
    [InlineData("PUT", "/v1/adapters", "GET, POST")]
    [InlineData("GET", "/v1/adapters/a", "DELETE")]
    public async Task A_known_route_with_another_method_is_405(string method, string path, string allow)
    {
        using var request = new HttpRequestMessage(new HttpMethod(method), path) { Content = method == "GET" ? null : Body(new { }) };
        using var response = await client.SendAsync(request);

        var text = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.MethodNotAllowed, $"{(int)response.StatusCode}: {text}");
        Assert.Equal("method_not_allowed", JsonDocument.Parse(text).RootElement.GetProperty("error").GetProperty("code").GetString());
        Assert.Equal(allow, string.Join(", ", response.Content.Headers.Allow));
    }

    [Fact]
    public async Task An_unknown_route_is_still_404()
    {
        var (status, body) = await Call(HttpMethod.Get, "/v1/nothing");

        Assert.Equal(HttpStatusCode.NotFound, status);
        Assert.Equal("not_found", body.GetProperty("error").GetProperty("code").GetString());
    }

    [Fact]
    public async Task A_body_over_the_limit_is_413()
    {
        // Kestrel's default limit is 30 MB; the Content-Length says more, so the first read of the body fails.
        var content = new ByteArrayContent(new byte[31 * 1024 * 1024]);
        content.Headers.ContentType = new System.Net.Http.Headers.MediaTypeHeaderValue("application/json");
        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/completions") { Content = content };
        request.Headers.ExpectContinue = true; // the answer comes before the body is sent
        using var response = await client.SendAsync(request);

        var text = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.RequestEntityTooLarge, $"{(int)response.StatusCode}: {text}");
        Assert.Equal("invalid_request_error", JsonDocument.Parse(text).RootElement.GetProperty("error").GetProperty("type").GetString());
    }

    [Fact]
    public async Task Serve_refuses_an_adapter_named_as_the_base_model()
    {
        var run = fixture.Cli("serve", fixture.BaseModel, "--port", "0", "--name", "tiny", "-a", $"tiny={fixture.AdapterA}");

        // Before the fix this served forever (the adapter unreachable): give up rather than hang.
        var (code, _, error) = await run.WaitAsync(TimeSpan.FromSeconds(60));

        Assert.Equal(2, code);
        Assert.Contains("'tiny' is the base model's name", error);
    }
}
