namespace LoRAHub.Abstractions;

/// <summary>
/// A language model whose output head can share the input embedding's table (transformers' tie_word_embeddings). Tied,
/// such a model has no lm_head module of its own; methods that train a copy of the head or patch token rows of the shared
/// table (PEFT's modules_to_save=["lm_head"], trainable_token_indices) first give it one.
/// </summary>
public interface ITiedOutputHead
{
    /// <summary>Dotted path of the input embedding (transformers' get_input_embeddings): "model.embed_tokens", "transformer.wte".</summary>
    string InputEmbeddingsPath { get; }

    /// <summary>Dotted path of the output head, present or not ("lm_head").</summary>
    string OutputHeadPath { get; }

    /// <summary>True while logits are computed with the input embedding's table and no lm_head module exists.</summary>
    bool OutputHeadTied { get; }

    /// <summary>
    /// Gives a tied model an lm_head Linear (no bias) at <see cref="OutputHeadPath"/> whose weight IS the embedding's
    /// parameter, so logits are unchanged, and marks the model untied (config tie_word_embeddings false): a method may now
    /// swap the head's weight for a trained copy, and a saved folder carries lm_head.weight. No-op when untied.
    /// </summary>
    void UntieOutputHead();

    /// <summary>
    /// Undoes <see cref="UntieOutputHead"/> when the lm_head module holds the embedding's parameter again: the module goes
    /// and the model projects with the embedding (tie_word_embeddings true). Returns false, changing nothing, when the head
    /// holds a weight of its own (a trained copy kept by merge_and_unload) or is not a plain Linear.
    /// </summary>
    bool TryRetieOutputHead();
}
