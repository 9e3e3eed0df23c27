using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.HeadLoRA;

/// <summary>
/// HeadLoRA as PEFT's LoRA: a per-head update is a plain LoRA of rank Σ r_h. For q/k/v, lora_A stacks the heads' A_h
/// (Σr_h × in) and lora_B is block-diagonal, head h's B_h in its head_dim rows and its r_h columns; for o, lora_A is
/// block-diagonal (A_h in its r_h rows and head h's head_dim input columns) and lora_B concatenates the B_h. Each
/// module's scale is folded into lora_B and its lora_alpha equals its r, so PEFT's α/r is 1.
/// </summary>
internal static class PeftLoraExport
{
    public static void Save(string directory, IReadOnlyDictionary<string, HeadLoraLinear> layers, Func<HeadLoraLinear, Tensor?> keptIndex,
        HeadLoraOptions options, string baseModel)
    {
        using var scope = torch.NewDisposeScope();
        var tensors = new Dictionary<string, Tensor>();
        var ranks = new Dictionary<string, int>();
        using (torch.no_grad())
            foreach (var (path, layer) in layers)
            {
                var (a, b) = layer.ExpandedLora();
                if (keptIndex(layer) is { } idx) (a, b) = (a.index_select(0, idx), b.index_select(1, idx));
                if (a.size(0) == 0) continue; // every head pruned: the base layer, nothing to save
                tensors[PeftKeys.LoraA(path)] = a.contiguous();
                tensors[PeftKeys.LoraB(path)] = b.contiguous();
                ranks[path] = (int)a.size(0);
            }
        if (ranks.Count == 0) throw new InvalidOperationException("every head of every layer has rank 0: there is no LoRA to export");
        var first = ranks.First().Value;
        var lora = new LoraOptions
        {
            R = first,
            LoraAlpha = first,
            LoraDropout = options.LoraDropout,
            RankPattern = ranks.Where(p => p.Value != first).ToDictionary(p => p.Key, p => p.Value),
            AlphaPattern = ranks.Where(p => p.Value != first).ToDictionary(p => p.Key, p => (double)p.Value),
            FanInFanOut = layers.Values.Any(l => TargetResolver.IsConv1D(l)),
        };
        Directory.CreateDirectory(directory);
        AdapterWeightsFile.Write(Path.Combine(directory, AdapterWeightsFile.FileName), tensors);
        LoraConfigFile.Write(Path.Combine(directory, LoraConfigFile.FileName), lora, TargetModuleSpec.FromNames(ranks.Keys), baseModel);
    }
}
