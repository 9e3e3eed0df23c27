namespace LoRAHub.Models.Tokenization;

/// <summary>An entry of tokenizer.json's added_tokens: matched in the raw text before normalization and BPE.</summary>
public sealed record AddedToken(int Id, string Content, bool Special, bool LStrip = false, bool RStrip = false);
