namespace LoRAHub.Abstractions;

/// <summary>Text to token ids and back, plus what data formatting needs.</summary>
public interface ITokenizer
{
    int[] Encode(string text, bool addSpecialTokens = true);
    string Decode(IEnumerable<int> ids, bool skipSpecialTokens = true);
    int? BosTokenId { get; }
    int? EosTokenId { get; }
    int PadTokenId { get; }
    int VocabSize { get; }

    /// <summary>Renders chat messages (role, content) in the model's chat format.</summary>
    string ApplyChatTemplate(IReadOnlyList<(string Role, string Content)> messages, bool addGenerationPrompt);
}
