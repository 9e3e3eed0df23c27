using LoRAHub.Models.Tokenization;

namespace LoRAHub.Host.Everyday;

/// <summary>A plain text prompt, or a conversation rendered with the tokenizer's chat template (generation prompt added).</summary>
public sealed record Prompt
{
    private Prompt(string? text, IReadOnlyList<(string Role, string Content)>? messages)
    {
        Text = text;
        Messages = messages;
    }

    public string? Text { get; }
    public IReadOnlyList<(string Role, string Content)>? Messages { get; }

    public static Prompt FromText(string text) => new(text, null);

    public static Prompt FromMessages(IReadOnlyList<(string Role, string Content)> messages) =>
        messages.Count > 0 ? new(null, messages) : throw new ArgumentException("a chat needs at least one message");

    /// <summary>Token ids: the text with the tokenizer's special tokens (bos), or the rendered chat, whose template places its own.</summary>
    public int[] Encode(Tokenizer tokenizer) => Messages is null
        ? tokenizer.Encode(Text!, addSpecialTokens: true)
        : tokenizer.Encode(Render(tokenizer), addSpecialTokens: false);

    /// <summary>The prompt as text (a chat rendered through the template).</summary>
    public string Render(Tokenizer tokenizer) => Messages is null ? Text! : tokenizer.ApplyChatTemplate(Messages, addGenerationPrompt: true);
}
