using LoRAHub.Models.Tokenization;

namespace LoRAHub.Host.Everyday;

/// <summary>
/// Turns one row's tokens into text as they arrive: decodes the whole row each time and hands out only what is new,
/// holding back an incomplete UTF-8 character (a byte-level BPE token can end mid-character) and any tail that could
/// still become a stop string, and ends the text before a stop string (OpenAI's <c>stop</c>: not part of the answer).
/// </summary>
public sealed class TextStream(Tokenizer tokenizer, IReadOnlyList<string> stops)
{
    private readonly List<int> tokens = [];
    private int emitted;

    /// <summary>The text so far, stop string cut off.</summary>
    public string Text { get; private set; } = "";

    public bool Stopped { get; private set; }

    public IReadOnlyList<int> Tokens => tokens;

    /// <summary>Adds a token; returns the text that is now final (may be empty).</summary>
    public string Add(int token)
    {
        if (Stopped) return "";
        tokens.Add(token);
        var text = tokenizer.Decode(tokens);
        foreach (var stop in stops)
        {
            var at = text.IndexOf(stop, StringComparison.Ordinal);
            if (at < 0) continue;
            text = text[..at];
            Stopped = true;
        }
        Text = text;
        var safe = Stopped ? text.Length : SafeLength(text);
        if (safe <= emitted) return "";
        var delta = text[emitted..safe];
        emitted = safe;
        return delta;
    }

    /// <summary>What is still held back once the row has ended.</summary>
    public string Flush()
    {
        var delta = emitted < Text.Length ? Text[emitted..] : "";
        emitted = Text.Length;
        return delta;
    }

    private int SafeLength(string text)
    {
        var end = text.Length;
        if (end > 0 && text[end - 1] == '\uFFFD') end--;
        if (end > 0 && char.IsHighSurrogate(text[end - 1])) end--;
        foreach (var stop in stops)
            for (var k = Math.Min(stop.Length - 1, end); k > 0; k--)
                if (string.CompareOrdinal(text, end - k, stop, 0, k) == 0)
                {
                    end -= k;
                    break;
                }
        return Math.Max(end, 0);
    }
}
