using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Abstractions;

/// <summary>
/// A model that lets a trainer perform its token-embedding lookup in forward. Data parallelism uses it to take the
/// lookup's gradient as the rows it touches (token ids and their gradient rows) instead of a dense vocabulary-sized
/// tensor, so that the ranks exchange only those rows after backward (see the trainer's GradientSync).
/// </summary>
public interface IEmbeddingLookupHook
{
    /// <summary>The embedding table the lookup reads (a parameter), or null when the model's embedding is not a plain table.</summary>
    Tensor? EmbeddingTable { get; }

    /// <summary>Whether the table is also the output projection (tied word embeddings): its gradient then has a dense part too.</summary>
    bool EmbeddingTiedToHead { get; }

    /// <summary>
    /// Applied in forward, when grad mode is on and the table requires grad, instead of the lookup: (table, ids) →
    /// embeddings of shape ids.shape + [hidden], or null for the model's own lookup. Null: the model's own lookup.
    /// </summary>
    Func<Tensor, Tensor, Tensor?>? EmbeddingLookup { get; set; }
}
