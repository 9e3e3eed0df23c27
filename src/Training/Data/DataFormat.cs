using System.Text.Json;
using LoRAHub.Abstractions;

namespace LoRAHub.Training.Data;

public enum DataFormat
{
    /// <summary>Pick per record: messages → Chat, instruction → Instruction, prompt/completion → PromptCompletion, text → Text.</summary>
    Auto,
    /// <summary>Alpaca style {"instruction", "input"?, "output"}; loss on the output only.</summary>
    Instruction,
    /// <summary>{"prompt", "completion"}; loss on the completion only.</summary>
    PromptCompletion,
    /// <summary>{"messages": [{"role", "content"}, ...]} through the tokenizer's chat template; loss on assistant turns.</summary>
    Chat,
    /// <summary>{"text"}; loss on every token.</summary>
    Text,
}

/// <summary>Turns one JSON record into token ids with labels, masking prompt tokens with -100.</summary>
public static class RecordTokenizer
{
    /// <summary>The Alpaca prompt (with and without input), as in the Stanford Alpaca repository.</summary>
    public static string AlpacaPrompt(string instruction, string? input) => string.IsNullOrEmpty(input)
        ? "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n" +
          $"### Instruction:\n{instruction}\n\n### Response:\n"
        : "Below is an instruction that describes a task, paired with an input that provides further context. " +
          "Write a response that appropriately completes the request.\n\n" +
          $"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";

    public static TokenizedExample Tokenize(JsonElement record, DataFormat format, ITokenizer tokenizer)
    {
        var kind = format == DataFormat.Auto ? Detect(record) : format;
        return kind switch
        {
            DataFormat.Instruction => PromptAndResponse(tokenizer,
                AlpacaPrompt(RequiredString(record, "instruction"), OptionalString(record, "input")), RequiredString(record, "output")),
            DataFormat.PromptCompletion => PromptAndResponse(tokenizer, RequiredString(record, "prompt"), RequiredString(record, "completion")),
            DataFormat.Chat => Chat(tokenizer, record),
            DataFormat.Text => Text(tokenizer, RequiredString(record, "text")),
            _ => throw new FormatException("unknown data format"),
        };
    }

    private static DataFormat Detect(JsonElement r) =>
        r.TryGetProperty("messages", out _) ? DataFormat.Chat
        : r.TryGetProperty("instruction", out _) ? DataFormat.Instruction
        : r.TryGetProperty("prompt", out _) ? DataFormat.PromptCompletion
        : r.TryGetProperty("text", out _) ? DataFormat.Text
        : throw new FormatException("record has none of the fields messages, instruction, prompt or text");

    private static string RequiredString(JsonElement r, string name) =>
        r.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String
            ? v.GetString()!
            : throw new FormatException(r.TryGetProperty(name, out var w) ? $"field '{name}' must be a string, found {w.ValueKind}" : $"missing field '{name}'");

    private static string? OptionalString(JsonElement r, string name) =>
        r.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;

    private static TokenizedExample PromptAndResponse(ITokenizer tok, string prompt, string response)
    {
        var promptIds = tok.Encode(prompt, addSpecialTokens: true);
        var responseIds = tok.Encode(response, addSpecialTokens: false);
        var eos = tok.EosTokenId is int e ? new[] { e } : [];
        var ids = promptIds.Concat(responseIds).Concat(eos).ToArray();
        var labels = Enumerable.Repeat(TokenizedExample.IgnoreIndex, promptIds.Length).Concat(responseIds).Concat(eos).ToArray();
        return new TokenizedExample(ids, labels);
    }

    private static TokenizedExample Text(ITokenizer tok, string text)
    {
        var ids = tok.Encode(text, addSpecialTokens: true);
        if (tok.EosTokenId is int e) ids = [.. ids, e];
        return new TokenizedExample(ids, (int[])ids.Clone());
    }

    private static TokenizedExample Chat(ITokenizer tok, JsonElement record)
    {
        if (!record.TryGetProperty("messages", out var list) || list.ValueKind != JsonValueKind.Array || list.GetArrayLength() == 0)
            throw new FormatException("'messages' must be a non-empty array");
        var messages = new List<(string Role, string Content)>();
        foreach (var m in list.EnumerateArray())
        {
            if (m.ValueKind != JsonValueKind.Object) throw new FormatException("each message must be an object with role and content");
            messages.Add((RequiredString(m, "role"), RequiredString(m, "content")));
        }
        if (!messages.Any(m => m.Role == "assistant")) throw new FormatException("the conversation has no assistant message to learn from");

        // Tokenize the whole conversation once; label the span each assistant turn adds to the rendered text.
        var ids = tok.Encode(tok.ApplyChatTemplate(messages, addGenerationPrompt: false), addSpecialTokens: false);
        var labels = Enumerable.Repeat(TokenizedExample.IgnoreIndex, ids.Length).ToArray();
        for (var i = 0; i < messages.Count; i++)
        {
            if (messages[i].Role != "assistant") continue;
            var start = tok.Encode(tok.ApplyChatTemplate(messages.Take(i).ToList(), addGenerationPrompt: true), addSpecialTokens: false).Length;
            var end = Math.Min(ids.Length, tok.Encode(tok.ApplyChatTemplate(messages.Take(i + 1).ToList(), addGenerationPrompt: false), addSpecialTokens: false).Length);
            for (var t = start; t < end; t++) labels[t] = ids[t];
        }
        return new TokenizedExample(ids, labels);
    }
}
