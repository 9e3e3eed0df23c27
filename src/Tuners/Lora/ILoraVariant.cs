using LoRAHub.TorchExtensions;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Tuners.Lora;

/// <summary>
/// A variant of one LoRA adapter (PEFT's LoraVariant, e.g. DoRA), the extension point for LoRA variants in and outside
/// this repository: it keeps the adapter's A, B, dropout and scaling but changes what they do in forward, merge and
/// unmerge, and may add per-layer tensors saved with the adapter.
/// Options pick it (<see cref="LoraOptions.ResolveLoraVariant"/>); one instance serves every layer of an adapter, so
/// per-layer state lives on the <see cref="LoraLinear"/> (as child modules, keeping PEFT's parameter paths).
/// </summary>
public interface ILoraVariant
{
    /// <summary>
    /// The adapter_config.json key that selects this variant when set (true, or a non-empty value): PEFT's "use_dora",
    /// "alora_invocation_tokens", "kasa_config", ... Saving writes true unless the variant's options hold the value under a
    /// <see cref="ConfigKeyAttribute"/> field of that key.
    /// </summary>
    string ConfigFlag { get; }

    /// <summary>
    /// Options with this variant's defaults (a <see cref="LoraOptions"/> subclass whose <see cref="ConfigKeyAttribute"/>
    /// fields hold the variant's own saved settings), filled from a PEFT config whose <see cref="ConfigFlag"/> is set.
    /// </summary>
    LoraOptions CreateOptions();

    /// <summary>Called once A and B of <paramref name="adapter"/> exist (initialised) on the layer.</summary>
    void Init(LoraLinear layer, string adapter);

    /// <summary>The layer's output for an unmerged, enabled adapter, given base(x) already computed as <paramref name="result"/>.</summary>
    Tensor Forward(LoraLinear layer, string adapter, Tensor x, Tensor result);

    /// <summary>Folds the adapter into the base weight (through <see cref="LoraLinear.AddToBaseWeight"/>).</summary>
    void Merge(LoraLinear layer, string adapter);

    /// <summary>Undoes <see cref="Merge"/>.</summary>
    void Unmerge(LoraLinear layer, string adapter);

    /// <summary>Frees the adapter's own state on the layer (PEFT's delete_adapter); A, B and dropout are the layer's.</summary>
    void Delete(LoraLinear layer, string adapter) { }

    /// <summary>
    /// The adapter's extra trainable tensors on this layer by their key relative to the layer, as PEFT saves them
    /// (e.g. "lora_magnitude_vector"). Live tensors: do not dispose.
    /// </summary>
    IEnumerable<(string key, Parameter tensor)> Tensors(LoraLinear layer, string adapter);

    /// <summary>The keys and shapes <see cref="Tensors"/> will have on a base layer at rank r (to check a file before loading).</summary>
    IEnumerable<(string key, long[] shape)> Shapes(ILinearLayer baseLayer, int r);

    /// <summary>
    /// What the fused LoRA blocks (<see cref="LoraFusion"/>) may compute for this adapter on this layer, given
    /// <paramref name="plain"/>, the parts plain LoRA would have (frozen base, A, B, s; the layer has already checked
    /// one active adapter, no dropout in training, no lora bias, no row routing): parts that compute exactly what
    /// <see cref="Forward"/> does (e.g. plain with a <see cref="LowRankParts.RowScale"/>), or null and why not. The default
    /// offers none: a variant is fused only where it says how.
    /// </summary>
    LowRankParts? FusedParts(LoraLinear layer, string adapter, LowRankParts plain, out string reason)
    {
        reason = $"variant {GetType().Name}";
        return null;
    }
}
