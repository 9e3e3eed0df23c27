using LoRAHub.Plugins.AdaLoRA;
using LoRAHub.Plugins.DoRA;
using LoRAHub.Plugins.LoRA;
using LoRAHub.Plugins.LongLoRA;
using LoRAHub.Plugins.MALoRA;
using LoRAHub.Plugins.QLoRA;

namespace LoRAHub.Conformance.Tests;

/// <summary>
/// One method plugin under PEFT's generic checks: how to make its options (optionally with modules_to_save and
/// layers_to_transform), and, for each check it cannot take, the reason (null: it takes the check).
/// </summary>
public sealed record MethodCase(string Name, Func<IAdapterMethod> Create, Func<ScalarType, bool, List<int>?, object> Options)
{
    /// <summary>Why merge/unmerge/merge_and_unload does not apply, or null.</summary>
    public string? NoMerge { get; init; }

    /// <summary>Why an in-place Merge/Unmerge is refused although merge_and_unload works, or null.</summary>
    public string? NoInPlaceMerge { get; init; }

    /// <summary>Why named adapters and mixed batches (IAdapterSet) do not apply, or null.</summary>
    public string? NoAdapterSet { get; init; }

    /// <summary>Why modules_to_save cannot be set, or null.</summary>
    public string? NoModulesToSave { get; init; }

    /// <summary>The base is quantized on attach: references are computed on the dequantized base.</summary>
    public bool Quantizes { get; init; }

    public override string ToString() => Name;

    public static readonly MethodCase[] All =
    [
        new("lora", () => new LoraMethod(), (_, saved, layers) => new LoraOptions
        {
            R = 4, LoraAlpha = 8, TargetModules = new[] { "q_proj", "v_proj", "down_proj" },
            ModulesToSave = saved ? ["lm_head"] : null, LayersToTransform = layers,
        }),
        new("dora", () => new DoraMethod(), (_, saved, layers) => new DoraOptions
        {
            R = 4, LoraAlpha = 8, TargetModules = new[] { "q_proj", "v_proj", "down_proj" },
            ModulesToSave = saved ? ["lm_head"] : null, LayersToTransform = layers,
        }),
        new("qlora", () => new QLoraMethod(), (dtype, saved, layers) => new QLoraOptions
        {
            R = 4, LoraAlpha = 8, Device = "cpu", Bnb4bitComputeDtype = dtype == ScalarType.BFloat16 ? "bfloat16" : "float32",
            ModulesToSave = saved ? ["lm_head"] : null, LayersToTransform = layers,
        })
        {
            Quantizes = true,
            NoInPlaceMerge = "merging into a 4-bit base in place would quantize again (lossy); QLoRA merges only through merge_and_unload",
        },
        new("adalora", () => new AdaLoraMethod(), (_, _, layers) => new AdaLoraOptions
        {
            InitR = 4, TargetR = 2, Tinit = 1, Tfinal = 1, DeltaT = 1, TotalStep = 6, LoraAlpha = 8,
            TargetModules = new[] { "q_proj", "v_proj" }, LayersToTransform = layers,
        })
        {
            NoAdapterSet = "an AdaLoRA model holds one adapter (PEFT allows one trainable AdaLoRA adapter)",
            NoModulesToSave = "AdaLoRA's options have no modules_to_save",
        },
        new("longlora", () => new LongLoraMethod(), (_, _, layers) => new LongLoraOptions
        {
            R = 4, LoraAlpha = 8, LayersToTransform = layers,
        })
        {
            NoModulesToSave = "LongLoRA always trains the embeddings and norms as modules_to_save (its own choice of modules)",
            NoAdapterSet = "mixed batches refuse adapters with modules_to_save, and LongLoRA always has them",
        },
        new("malora", () => new MaLoraMethod(), (_, _, layers) => new MaLoraOptions
        {
            NumExperts = 2, TopK = 1, SharedRank = 2, ExpertRank = 2, LoraAlpha = 4, LayersToTransform = layers,
        })
        {
            NoMerge = "token-routed experts: the update depends on each token's gate, so it has no single weight to merge",
            NoAdapterSet = "a MALoRA model holds one adapter",
            NoModulesToSave = "MALoRA's options have no modules_to_save",
        },
    ];

    public static TheoryData<string> Names()
    {
        var data = new TheoryData<string>();
        foreach (var m in All) data.Add(m.Name);
        return data;
    }

    public static MethodCase Get(string name) => All.Single(m => m.Name == name);
}
