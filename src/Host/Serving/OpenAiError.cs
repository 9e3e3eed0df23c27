using System.Text.Json.Serialization;

namespace LoRAHub.Host.Serving;

/// <summary>A request the server refuses, with OpenAI's error shape: <c>{"error": {"message", "type", "param", "code"}}</c>.</summary>
public sealed class OpenAiError(int status, string message, string? param = null, string? code = null, string type = "invalid_request_error")
    : Exception(message)
{
    public int Status { get; } = status;
    public string? Param { get; } = param;
    public string? Code { get; } = code;
    public string Type { get; } = type;

    public ErrorBody Body() => new(new ErrorDetail(Message, Type, Param, Code));

    public static OpenAiError BadRequest(string message, string? param = null) => new(400, message, param);

    /// <summary>Prompt and max_tokens together past the model's positions (OpenAI's code and wording, with the fix).</summary>
    public static OpenAiError ContextLengthExceeded(int context, int prompt, int maxTokens, bool chat) =>
        new(400, $"This model's maximum context length is {context} tokens. However, you requested {prompt + maxTokens} tokens " +
            $"({prompt} in the {(chat ? "messages" : "prompt")}, {maxTokens} in the completion). Please reduce the length of the " +
            $"{(chat ? "messages" : "prompt")} or {(chat ? "max_completion_tokens" : "max_tokens")}.", chat ? "messages" : "prompt", "context_length_exceeded");

    public static OpenAiError ModelNotFound(string model) =>
        new(404, $"The model '{model}' does not exist. GET /v1/models lists the base model and the adapters.", "model", "model_not_found");
}

public sealed record ErrorBody([property: JsonPropertyName("error")] ErrorDetail Error);

public sealed record ErrorDetail(
    [property: JsonPropertyName("message")] string Message,
    [property: JsonPropertyName("type")] string Type,
    [property: JsonPropertyName("param")] string? Param,
    [property: JsonPropertyName("code")] string? Code);
