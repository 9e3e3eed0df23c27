using System.Net;
using System.Text;
using System.Text.Json;
using LoRAHub.Host.Everyday;
using LoRAHub.Host.Serving;
using Microsoft.Extensions.Logging.Abstractions;

namespace LoRAHub.Host.Tests;

/// <summary>
/// What serve reads from a request, as OpenAI's API means it: a fresh sampling seed per request unless one is given (any
/// integer), chat's max_completion_tokens over max_tokens (a null one hides nothing), refusals naming the field that was
/// sent, fields we cannot honour refused instead of ignored, and prompt plus completion within the model's positions.
/// </summary>
[Collection(EmbeddedModelCollection.Name)]
public sealed class ServeRequestTests(EmbeddedModelFixture fixture)
{
    private static CompletionRequest Parse(string json, bool chat = false) => CompletionRequest.Parse(JsonDocument.Parse(json).RootElement, chat, 4096);

    private static OpenAiError Refused(string json, bool chat = false) => Assert.Throws<OpenAiError>(() => Parse(json, chat));

    private const string Chat = "\"model\": \"a\", \"messages\": [{\"role\": \"user\", \"content\": \"copy abcd\"}]";

    [Fact]
    public void Without_a_seed_each_request_draws_its_own_and_any_integer_seed_is_taken()
    {
        var seeds = Enumerable.Range(0, 8).Select(_ => Parse("{\"model\": \"a\", \"prompt\": \"x\", \"temperature\": 1.5}").Seed).ToHashSet();
        Assert.True(seeds.Count > 1, "every request without a seed got the same seed");
        Assert.Equal(7, Parse("{\"model\": \"a\", \"prompt\": \"x\", \"seed\": 7}").Seed);
        var big = Parse("{\"model\": \"a\", \"prompt\": \"x\", \"seed\": 12345678901}").Seed;
        Assert.Equal(big, Parse("{\"model\": \"a\", \"prompt\": \"x\", \"seed\": 12345678901}").Seed);
        Assert.NotEqual(big, Parse("{\"model\": \"a\", \"prompt\": \"x\", \"seed\": 12345678902}").Seed);
        Assert.Equal("seed", Refused("{\"model\": \"a\", \"prompt\": \"x\", \"seed\": 1.5}").Param);
    }

    [Fact]
    public void Chat_takes_max_completion_tokens_names_it_when_refused_and_a_null_one_leaves_max_tokens()
    {
        Assert.Equal(3, Parse($"{{{Chat}, \"max_completion_tokens\": null, \"max_tokens\": 3}}", chat: true).MaxTokens);
        Assert.Equal(5, Parse($"{{{Chat}, \"max_completion_tokens\": 5, \"max_tokens\": 3}}", chat: true).MaxTokens);
        var e = Refused($"{{{Chat}, \"max_completion_tokens\": 0}}", chat: true);
        Assert.Equal("max_completion_tokens", e.Param);
        Assert.StartsWith("max_completion_tokens must be between 1 and 4096", e.Message);
    }

    [Theory]
    [InlineData("{\"model\": \"a\", \"prompt\": [5, 6, 7]}", false, "prompt", "token-id prompts are not supported")]
    [InlineData("{\"model\": \"a\", \"prompt\": [[5, 6], [7]]}", false, "prompt", "token-id prompts are not supported")]
    [InlineData("{\"model\": \"a\", \"prompt\": [\"x\", \"y\"]}", false, "prompt", "one prompt per request")]
    [InlineData("{\"model\": \"a\", \"prompt\": \"x\", \"logprobs\": 2}", false, "logprobs", "'logprobs' is not supported")]
    [InlineData("{\"model\": \"a\", \"prompt\": \"x\", \"echo\": true}", false, "echo", "'echo' is not supported")]
    [InlineData("{\"model\": \"a\", \"prompt\": \"x\", \"best_of\": 3}", false, "best_of", "'best_of' is not supported")]
    [InlineData("{" + Chat + ", \"logprobs\": true}", true, "logprobs", "'logprobs' is not supported")]
    [InlineData("{" + Chat + ", \"top_logprobs\": 2}", true, "top_logprobs", "'top_logprobs' is not supported")]
    public void Fields_we_cannot_honour_are_refused_by_name(string json, bool chat, string param, string message)
    {
        var e = Refused(json, chat);
        Assert.Equal((400, param), (e.Status, e.Param));
        Assert.StartsWith(message, e.Message);
    }

    [Theory]
    [InlineData("{\"model\": \"a\", \"prompt\": \"x\", \"logprobs\": null, \"echo\": false, \"best_of\": 1}", false)]
    [InlineData("{" + Chat + ", \"logprobs\": false, \"top_logprobs\": null}", true)]
    public void Their_default_values_are_accepted(string json, bool chat) => Parse(json, chat);

    [Fact]
    public async Task A_stream_that_asks_for_usage_ends_with_openais_usage_chunk()
    {
        await using var served = await ServedModel.StartAsync(fixture, new ServeOptions { Port = 0, BaseName = "tiny" });
        async Task<List<string>> Chunks(object body)
        {
            using var response = await served.Client.PostAsync("/v1/completions", ServedModel.Body(body));
            var text = await response.Content.ReadAsStringAsync();
            Assert.True(response.StatusCode == HttpStatusCode.OK, text);
            return text.Split('\n').Where(l => l.StartsWith("data: ", StringComparison.Ordinal)).Select(l => l["data: ".Length..]).ToList();
        }

        var chunks = await Chunks(new { model = "tiny", prompt = "copy abcd = ", max_tokens = 4, temperature = 0, stream = true,
            stream_options = new { include_usage = true } });
        Assert.Equal("[DONE]", chunks[^1]);
        var last = JsonDocument.Parse(chunks[^2]).RootElement;
        Assert.Equal(0, last.GetProperty("choices").GetArrayLength());
        var usage = last.GetProperty("usage");
        Assert.Equal(12, usage.GetProperty("prompt_tokens").GetInt32()); // "copy abcd = " is 12 characters, one token each
        Assert.Equal(usage.GetProperty("prompt_tokens").GetInt32() + usage.GetProperty("completion_tokens").GetInt32(), usage.GetProperty("total_tokens").GetInt32());
        // Without stream_options: no usage chunk.
        var plain = await Chunks(new { model = "tiny", prompt = "copy abcd = ", max_tokens = 4, temperature = 0, stream = true });
        Assert.DoesNotContain(plain, c => c.Contains("\"usage\""));
    }

    [Fact]
    public async Task Prompt_and_completion_past_the_models_positions_are_refused_with_openais_code()
    {
        await using var served = await ServedModel.StartAsync(fixture, new ServeOptions { Port = 0, BaseName = "tiny" });
        Assert.Equal(256, served.Model.ContextLength); // examples/base-model's max_position_embeddings
        async Task<(HttpStatusCode, string)> Send(int maxTokens)
        {
            using var response = await served.Client.PostAsync("/v1/completions", ServedModel.Body(new { model = "tiny", prompt = "copy abcd = ", max_tokens = maxTokens }));
            return (response.StatusCode, await response.Content.ReadAsStringAsync());
        }

        var (status, text) = await Send(300);
        Assert.True(status == HttpStatusCode.BadRequest, text);
        var error = JsonDocument.Parse(text).RootElement.GetProperty("error");
        Assert.Equal("context_length_exceeded", error.GetProperty("code").GetString());
        Assert.Equal("prompt", error.GetProperty("param").GetString());
        Assert.StartsWith("This model's maximum context length is 256 tokens.", error.GetProperty("message").GetString());
        (status, text) = await Send(4);
        Assert.True(status == HttpStatusCode.OK, text);
    }
}
