using System.Text.Json;
using LoRAHub.Host.Everyday;
using LoRAHub.Models.Generation;

namespace LoRAHub.Host.Serving;

/// <summary>
/// The fields of /v1/completions and /v1/chat/completions that we honour, read by hand so that every bad field gets a
/// 400 naming it (a wrong type, a value out of range, an unsupported <c>n</c>) instead of a serializer's exception.
/// </summary>
public sealed record CompletionRequest(string Model, Prompt Prompt, int MaxTokens, double Temperature, double TopP, int TopK, int Seed,
    IReadOnlyList<string> Stop, bool Stream, bool IncludeUsage = false)
{
    /// <param name="chat">/v1/chat/completions (messages) rather than /v1/completions (prompt).</param>
    public static CompletionRequest Parse(JsonElement body, bool chat, int maxTokensLimit)
    {
        if (body.ValueKind != JsonValueKind.Object) throw OpenAiError.BadRequest("the request body must be a JSON object");
        var model = String(body, "model") ?? throw OpenAiError.BadRequest("missing required field 'model'", "model");
        Prompt prompt;
        if (chat)
        {
            if (!body.TryGetProperty("messages", out var list) || list.ValueKind != JsonValueKind.Array || list.GetArrayLength() == 0)
                throw OpenAiError.BadRequest("'messages' must be a non-empty array of {role, content}", "messages");
            var messages = new List<(string, string)>();
            foreach (var m in list.EnumerateArray())
            {
                if (m.ValueKind != JsonValueKind.Object) throw OpenAiError.BadRequest("each message must be an object with role and content", "messages");
                var role = String(m, "role", "messages") ?? throw OpenAiError.BadRequest("a message has no 'role'", "messages");
                if (role is not ("system" or "user" or "assistant" or "developer"))
                    throw OpenAiError.BadRequest($"unknown role '{role}'; use system, user or assistant", "messages");
                messages.Add((role == "developer" ? "system" : role, Content(m)));
            }
            prompt = Prompt.FromMessages(messages);
        }
        else
        {
            if (!body.TryGetProperty("prompt", out var p)) throw OpenAiError.BadRequest("missing required field 'prompt'", "prompt");
            var text = p.ValueKind switch
            {
                JsonValueKind.String => p.GetString()!,
                JsonValueKind.Array when p.GetArrayLength() == 1 && p[0].ValueKind == JsonValueKind.String => p[0].GetString()!,
                JsonValueKind.Array when p.EnumerateArray().Any(e => e.ValueKind is JsonValueKind.Number or JsonValueKind.Array) =>
                    throw OpenAiError.BadRequest("token-id prompts are not supported: send the prompt as text", "prompt"),
                JsonValueKind.Array => throw OpenAiError.BadRequest("one prompt per request: send several requests (they are batched together)", "prompt"),
                _ => throw OpenAiError.BadRequest("'prompt' must be a string", "prompt"),
            };
            if (text.Length == 0) throw OpenAiError.BadRequest("'prompt' is empty", "prompt");
            prompt = Prompt.FromText(text);
        }
        // Chat's max_completion_tokens replaces the older max_tokens; a null one does not hide max_tokens.
        var maxName = chat && body.TryGetProperty("max_completion_tokens", out var mct) && mct.ValueKind != JsonValueKind.Null ? "max_completion_tokens" : "max_tokens";
        var maxTokens = Int(body, maxName) ?? (chat ? 256 : 16);
        var sampling = new GenerationOptions
        {
            MaxNewTokens = maxTokens, Temperature = Number(body, "temperature") ?? 1.0, TopP = Number(body, "top_p") ?? 1.0, TopK = Int(body, "top_k") ?? 0,
        };
        try
        {
            // The rule generate's options follow too, so that both say the same.
            sampling.Validate(Names with { MaxNewTokens = maxName }, maxTokensLimit);
        }
        catch (InvalidGenerationOptionException e)
        {
            throw OpenAiError.BadRequest(e.Message, e.Option);
        }
        if ((Int(body, "n") ?? 1) != 1) throw OpenAiError.BadRequest("only n = 1 is supported: send several requests (they are batched together)", "n");
        Unsupported(body, chat);
        return new CompletionRequest(model, prompt, maxTokens, sampling.Temperature, sampling.TopP, Math.Max(0, sampling.TopK), SeedOf(body),
            Stops(body), Bool(body, "stream") ?? false, UsageAsked(body));
    }

    // stream_options.include_usage: a last chunk with the token counts before [DONE] (clients count tokens from it).
    private static bool UsageAsked(JsonElement body)
    {
        if (!body.TryGetProperty("stream_options", out var o) || o.ValueKind == JsonValueKind.Null) return false;
        if (o.ValueKind != JsonValueKind.Object) throw OpenAiError.BadRequest("'stream_options' must be an object", "stream_options");
        return Bool(o, "include_usage") ?? false;
    }

    // OpenAI's seed is any integer; without one every request draws anew (a fixed default would give every request the
    // same "random" answer).
    private static int SeedOf(JsonElement body)
    {
        if (!body.TryGetProperty("seed", out var v) || v.ValueKind == JsonValueKind.Null) return Random.Shared.Next();
        if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt64(out var seed)) throw OpenAiError.BadRequest("'seed' must be an integer", "seed");
        return unchecked((int)(seed ^ (seed >> 32)));
    }

    // Fields whose non-default values we cannot honour: refused rather than silently ignored (a client asking for
    // logprobs would get null).
    private static void Unsupported(JsonElement body, bool chat)
    {
        bool Set(string name) => body.TryGetProperty(name, out var v) && v.ValueKind switch
        {
            JsonValueKind.Null or JsonValueKind.False => false,
            JsonValueKind.Number => v.GetDouble() != 0,
            _ => true,
        };
        foreach (var name in chat ? new[] { "logprobs", "top_logprobs" } : ["logprobs", "echo"])
            if (Set(name)) throw OpenAiError.BadRequest($"'{name}' is not supported by this server", name);
        if ((Int(body, "best_of") ?? 1) > 1) throw OpenAiError.BadRequest("'best_of' is not supported: send several requests", "best_of");
    }

    /// <summary>The request fields that carry <see cref="GenerationOptions"/>' settings.</summary>
    public static readonly GenerationOptionNames Names = new("max_tokens", "temperature", "top_k", "top_p");

    private static string Content(JsonElement message)
    {
        if (!message.TryGetProperty("content", out var c)) throw OpenAiError.BadRequest("a message has no 'content'", "messages");
        return c.ValueKind switch
        {
            JsonValueKind.String => c.GetString()!,
            // The array form: text parts only.
            JsonValueKind.Array => string.Concat(c.EnumerateArray().Select(part =>
                part.ValueKind == JsonValueKind.Object && String(part, "type", "messages") == "text" && String(part, "text", "messages") is { } t
                    ? t : throw OpenAiError.BadRequest("only text content parts are supported", "messages"))),
            _ => throw OpenAiError.BadRequest("a message's 'content' must be a string or an array of text parts", "messages"),
        };
    }

    private static IReadOnlyList<string> Stops(JsonElement body)
    {
        if (!body.TryGetProperty("stop", out var s) || s.ValueKind == JsonValueKind.Null) return [];
        var stops = s.ValueKind switch
        {
            JsonValueKind.String => [s.GetString()!],
            JsonValueKind.Array when s.EnumerateArray().All(e => e.ValueKind == JsonValueKind.String) => s.EnumerateArray().Select(e => e.GetString()!).ToList(),
            _ => throw OpenAiError.BadRequest("'stop' must be a string or an array of strings", "stop"),
        };
        if (stops.Count > 4 || stops.Any(x => x.Length == 0)) throw OpenAiError.BadRequest("'stop' takes up to 4 non-empty strings", "stop");
        return stops;
    }

    private static string? String(JsonElement o, string name, string? param = null) =>
        !o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null ? null
        : v.ValueKind == JsonValueKind.String ? v.GetString()
        : throw OpenAiError.BadRequest($"'{name}' must be a string", param ?? name);

    private static int? Int(JsonElement o, string name) =>
        !o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null ? null
        : v.ValueKind == JsonValueKind.Number && v.TryGetInt32(out var i) ? i
        : throw OpenAiError.BadRequest($"'{name}' must be an integer", name);

    private static double? Number(JsonElement o, string name) =>
        !o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null ? null
        : v.ValueKind == JsonValueKind.Number ? v.GetDouble()
        : throw OpenAiError.BadRequest($"'{name}' must be a number", name);

    private static bool? Bool(JsonElement o, string name) =>
        !o.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null ? null
        : v.ValueKind is JsonValueKind.True or JsonValueKind.False ? v.GetBoolean()
        : throw OpenAiError.BadRequest($"'{name}' must be true or false", name);
}
