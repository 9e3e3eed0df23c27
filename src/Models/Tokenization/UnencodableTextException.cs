namespace LoRAHub.Models.Tokenization;

/// <summary>
/// Text with a character the tokenizer cannot encode: not in the vocabulary, and the tokenizer has neither byte
/// fallback nor an unk_token to stand in for it. Bad input, not a broken tokenizer: the message names the character
/// and where it is, so that the caller can remove or replace it.
/// </summary>
public sealed class UnencodableTextException : ArgumentException
{
    public UnencodableTextException(string character, int? position)
        : base($"the text has {Describe(character)}" + (position is { } p ? $" at position {p}" : "") +
               ", which this model's vocabulary cannot encode (no such token, no byte fallback, no unk_token); remove or replace it")
    {
        Character = character;
        Position = position;
    }

    /// <summary>The character (one code point; two UTF-16 units for a surrogate pair).</summary>
    public string Character { get; }

    /// <summary>Its 0-based UTF-16 index in the text given to Encode, when known.</summary>
    public int? Position { get; }

    /// <summary>'é' (U+00E9); a control character by its code point alone.</summary>
    private static string Describe(string s)
    {
        var codes = string.Join(" ", s.EnumerateRunes().Select(r => $"U+{r.Value:X4}"));
        return s.Any(char.IsControl) ? codes : $"'{s}' ({codes})";
    }
}
