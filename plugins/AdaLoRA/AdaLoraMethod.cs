using LoRAHub.Abstractions;
using LoRAHub.Tuners;

namespace LoRAHub.Plugins.AdaLoRA;

/// <summary>The "adalora" method: adaptive budget allocation for LoRA (Zhang et al. 2023), PEFT-compatible.</summary>
public sealed class AdaLoraMethod : AdapterMethod<AdaLoraOptions>
{
    public override string Name => "adalora";

    public override string Description => "AdaLoRA: SVD-shaped adapters whose rank budget moves to the important layers while training (PEFT-compatible)";

    public override IAdapter Attach(IAdaptableModel model, AdaLoraOptions options)
    {
        options.Validate();
        return new AdaLoraAdapter(this, model, options);
    }

    /// <summary>Loads a PEFT AdaLoRA folder: layers get the ranks its rank_pattern kept, with the scale of training (ranknum = init_r).</summary>
    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var options = AdaLoraFiles.ReadOptions(directory);
        options.TotalStep ??= options.Tinit + options.Tfinal + 1; // not needed for inference; keeps Validate's schedule check meaningful
        options.Validate();
        var ranks = options.RankPattern?.ToDictionary(p => p.Key[..^".lora_E".Length], p => p.Value.Count(k => k));
        // The layers already have the saved ranks, so the file's pruned tensors go straight into A, E and B.
        return Adapters.Build(new AdaLoraAdapter(this, model, options, ranks), a => a.LoadWeights(directory));
    }

    /// <summary>A PEFT folder with peft_type ADALORA.</summary>
    public override bool Claims(string directory) => AdapterFolder.PeftType(directory) == "ADALORA";
}
