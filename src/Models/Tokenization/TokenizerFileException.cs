namespace LoRAHub.Models.Tokenization;

/// <summary>
/// A tokenizer.json or tokenizer_config.json that cannot be read as one: not JSON, or a field missing or of the wrong
/// kind. The message starts with the file's path and the field at fault, e.g. <c>/m/tokenizer.json: 'model.vocab': ...</c>.
/// </summary>
public sealed class TokenizerFileException(string path, string field, string message, Exception? inner = null)
    : FormatException($"{path}: '{field}': {message}", inner)
{
    /// <summary>The file at fault.</summary>
    public string FilePath { get; } = path;

    /// <summary>The field at fault as a JSON path inside the file ("model.vocab", "added_tokens[3]"; "(file)" for the whole file).</summary>
    public string Field { get; } = field;
}
