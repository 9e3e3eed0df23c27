namespace LoRAHub.Abstractions;

/// <summary>
/// Several named adapters on one model (PEFT's multi-adapter PeftModel): load more, drop one, and serve a batch whose
/// rows use different adapters. Adapters that hold named sub-adapters implement it (the tuner kit's LoraAdapter: LoRA,
/// DoRA and every LoRA variant); test with <c>adapter is IAdapterSet set</c>.
/// </summary>
public interface IAdapterSet
{
    /// <summary>The name that means "no adapter" in <see cref="UseAdapterPerRow"/> (PEFT's "__base__").</summary>
    public const string BaseName = "__base__";

    /// <summary>Every adapter on the model, in the order they were added.</summary>
    IReadOnlyList<string> AdapterNames { get; }

    /// <summary>
    /// Loads a saved adapter folder under <paramref name="name"/> (PEFT's load_adapter): a new name is added inactive
    /// (active if it is the first); an existing name is hot-swapped in place.
    /// </summary>
    void LoadAdapter(string directory, string name);

    /// <summary>Removes an adapter and frees its tensors (PEFT's delete_adapter); an active one is replaced by the first remaining.</summary>
    void DeleteAdapter(string name);

    /// <summary>
    /// Mixed-batch inference (PEFT's <c>adapter_names=</c> of forward and generate): until the returned scope is
    /// disposed, every forward computes batch row i with adapter <paramref name="rowAdapters"/>[i], or with the base
    /// model alone where it is <see cref="BaseName"/>. Each forward's batch must have rowAdapters.Count rows.
    /// </summary>
    IDisposable UseAdapterPerRow(IReadOnlyList<string> rowAdapters);
}
