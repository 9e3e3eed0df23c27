using System.Text;

namespace LoRAHub.Models.Tokenization;

/// <summary>
/// Fixed chat formats (Jinja chat_template strings are not interpreted): chatml (Qwen), llama3, llama2 (also
/// Mistral-Instruct style [INST]), zephyr (TinyLlama-Chat) and plain "role: content" lines.
/// </summary>
public sealed class ChatTemplate
{
    private readonly Func<IReadOnlyList<(string Role, string Content)>, bool, string> render;

    private ChatTemplate(string name, Func<IReadOnlyList<(string Role, string Content)>, bool, string> render)
    {
        Name = name;
        this.render = render;
    }

    public string Name { get; }

    public static IReadOnlyList<string> Names => ["chatml", "llama3", "llama2", "zephyr", "plain"];

    public string Apply(IReadOnlyList<(string Role, string Content)> messages, bool addGenerationPrompt) => render(messages, addGenerationPrompt);

    public static ChatTemplate Get(string name) => name.ToLowerInvariant() switch
    {
        "chatml" => new("chatml", ChatMl),
        "llama3" => new("llama3", Llama3),
        "llama2" or "mistral" => new("llama2", Llama2),
        "zephyr" => new("zephyr", Zephyr),
        "plain" => new("plain", Plain),
        _ => throw new ArgumentException($"unknown chat template '{name}'; available: {string.Join(", ", Names)}"),
    };

    /// <summary>
    /// Checks that a Jinja chat_template is well-formed (tags closed, blocks balanced); a FormatException names
    /// <paramref name="name"/> and the line and column of the fault.
    /// </summary>
    public static void CheckJinja(string jinja, string name = "chat_template") => JinjaCheck.Check(jinja, name);

    /// <summary>Picks the format whose markers appear in a tokenizer_config.json chat_template; plain otherwise.</summary>
    public static ChatTemplate Guess(string jinja) =>
        jinja.Contains("<|im_start|>") ? Get("chatml")
        : jinja.Contains("<|start_header_id|>") ? Get("llama3")
        : jinja.Contains("[INST]") ? Get("llama2")
        : jinja.Contains("<|user|>") ? Get("zephyr")
        : Get("plain");

    private static string ChatMl(IReadOnlyList<(string Role, string Content)> messages, bool prompt)
    {
        var sb = new StringBuilder();
        foreach (var (role, content) in messages) sb.Append("<|im_start|>").Append(role).Append('\n').Append(content).Append("<|im_end|>\n");
        if (prompt) sb.Append("<|im_start|>assistant\n");
        return sb.ToString();
    }

    private static string Llama3(IReadOnlyList<(string Role, string Content)> messages, bool prompt)
    {
        var sb = new StringBuilder("<|begin_of_text|>");
        foreach (var (role, content) in messages)
            sb.Append("<|start_header_id|>").Append(role).Append("<|end_header_id|>\n\n").Append(content.Trim()).Append("<|eot_id|>");
        if (prompt) sb.Append("<|start_header_id|>assistant<|end_header_id|>\n\n");
        return sb.ToString();
    }

    // Llama 2 chat: the system prompt is folded into the first user turn; each exchange is <s>[INST] u [/INST] a </s>.
    private static string Llama2(IReadOnlyList<(string Role, string Content)> messages, bool prompt)
    {
        var sb = new StringBuilder();
        string? system = null;
        foreach (var (role, content) in messages)
        {
            switch (role)
            {
                case "system":
                    system = content;
                    break;
                case "user":
                    var text = system is null ? content.Trim() : $"<<SYS>>\n{system.Trim()}\n<</SYS>>\n\n{content.Trim()}";
                    system = null;
                    sb.Append("<s>[INST] ").Append(text).Append(" [/INST]");
                    break;
                default:
                    sb.Append(' ').Append(content.Trim()).Append(" </s>");
                    break;
            }
        }
        return sb.ToString(); // the generation prompt is the open [/INST] itself
    }

    private static string Zephyr(IReadOnlyList<(string Role, string Content)> messages, bool prompt)
    {
        var sb = new StringBuilder();
        foreach (var (role, content) in messages) sb.Append("<|").Append(role).Append("|>\n").Append(content).Append("</s>\n");
        if (prompt) sb.Append("<|assistant|>\n");
        return sb.ToString();
    }

    private static string Plain(IReadOnlyList<(string Role, string Content)> messages, bool prompt)
    {
        var sb = new StringBuilder();
        foreach (var (role, content) in messages) sb.Append(role).Append(": ").Append(content).Append('\n');
        if (prompt) sb.Append("assistant: ");
        return sb.ToString();
    }
}
