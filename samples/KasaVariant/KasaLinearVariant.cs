using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Modules;
using LoRAHub.Tuners.Lora;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Samples.KasaVariant;

/// <summary>
/// KaSA (Knowledge-aware Singular-value Adaptation, arXiv:2412.06071) as a LoRA variant, PEFT's KasaLinearVariant:
/// <list type="number">
/// <item>at init the frozen base weight W = U·S·Vᵀ loses its r smallest singular components (a one-time, destructive
/// truncation to rank k − r, k = min(in, out), computed in fp32);</item>
/// <item>the update is ΔW = s·B·diag(lora_diag)·A, with lora_diag a learnable r-vector (randn at init; B starts at zero,
/// so the layer starts at the truncated base).</item>
/// </list>
/// As in PEFT, disabling or unloading the adapter leaves the truncated base (merge then unmerge returns to it too).
/// </summary>
public sealed class KasaLinearVariant : ILoraVariant
{
    /// <summary>The layer's child holding the diagonals, and the saved key (PEFT's "…q_proj.lora_diag").</summary>
    public const string DiagonalKey = "lora_diag";

    public string ConfigFlag => KasaMethod.ConfigFlag;

    public LoraOptions CreateOptions() => new KasaOptions();

    /// <summary>The adapter's learnable diagonal ΔΣ on the layer.</summary>
    public static Parameter Diagonal(LoraLinear layer, string adapter) => Diagonals(layer)[adapter];

    private static KasaDiagonals Diagonals(LoraLinear layer)
    {
        if (layer.named_children().FirstOrDefault(c => c.name == DiagonalKey).module is KasaDiagonals existing) return existing;
        var diagonals = new KasaDiagonals();
        layer.register_module(DiagonalKey, diagonals);
        return diagonals;
    }

    /// <summary>The dense base weight KaSA truncates; 4-bit and GPT-2's Conv1D bases are refused (PEFT refuses fan_in_fan_out).</summary>
    private static Parameter BaseWeight(LoraLinear layer) => layer.base_layer switch
    {
        Linear { weight: { } w } => w,
        var other => throw new AdapterConfigurationException($"KaSA truncates dense nn.Linear weights (out×in) only; this layer's base is a " +
            $"{other.TypeName()}{(layer.IsQuantized ? " (4-bit: load the base in bf16 or fp32)" : "")}. Target Linear layers"),
    };

    /// <summary>Refuses a rank that would leave nothing of the base: k − r singular components must stay.</summary>
    public static void CheckRank(long inFeatures, long outFeatures, int r)
    {
        var k = Math.Min(inFeatures, outFeatures);
        if (r >= k)
            throw new AdapterConfigurationException($"KaSA option 'r' ({r}) must be smaller than min(in_features, out_features) ({k}) of every " +
                "target, so that at least one singular component of the base weight is kept");
    }

    public void Init(LoraLinear layer, string adapter)
    {
        var weight = BaseWeight(layer);
        var r = layer.Rank(adapter);
        CheckRank(weight.shape[1], weight.shape[0], r);
        var a = layer.A(adapter);
        using (no_grad())
        {
            var diagonal = new Parameter(randn([r], a.dtype, a.device));
            diagonal.requires_grad = a.requires_grad;
            Diagonals(layer).Set(adapter, diagonal);
        }
        Truncate(layer, weight, r);
    }

    /// <summary>W ← U[:, :k−r]·S[:k−r]·Vh[:k−r, :] (fp32 SVD, rounded once to W's dtype), as PEFT's _truncate_base_weight.</summary>
    public static void Truncate(LoraLinear layer, Parameter weight, int r)
    {
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var (u, s, vh) = linalg.svd(weight.detach().to(ScalarType.Float32), fullMatrices: false);
        var keep = Math.Min(weight.shape[0], weight.shape[1]) - r;
        var truncated = u.narrow(1, 0, keep).mul(s.narrow(0, 0, keep)).matmul(vh.narrow(0, 0, keep));
        weight.copy_(truncated.to(weight.dtype));
        layer.MarkWeightsChanged();
    }

    /// <summary>ΔW = s·(B·diag(ΔΣ))·A (out×in) in the adapter's dtype (PEFT's _get_delta_weight).</summary>
    public static Tensor DeltaWeight(LoraLinear layer, string adapter)
    {
        using var scope = NewDisposeScope();
        return layer.B(adapter).mul(Diagonal(layer, adapter)).matmul(layer.A(adapter)).mul(layer.Scaling(adapter)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// result + s·B(ΔΣ ⊙ A(dropout(x))), computed in the adapter's dtype; the sum takes PyTorch's promoted dtype and is cast
    /// back to the base output's dtype, as PEFT's Linear.forward does.
    /// </summary>
    public Tensor Forward(LoraLinear layer, string adapter, Tensor x, Tensor result)
    {
        using var scope = NewDisposeScope();
        var a = layer.A(adapter);
        var input = x.dtype == a.dtype ? x : x.to(a.dtype);
        var dropout = (nn.Module<Tensor, Tensor>)layer.lora_dropout[adapter];
        var afterA = nn.functional.linear(dropout.call(input), a);
        var update = nn.functional.linear(afterA.mul(Diagonal(layer, adapter)), layer.B(adapter)).mul(layer.Scaling(adapter));
        var sum = result.add(update);
        return (sum.dtype == result.dtype ? sum : sum.to(result.dtype)).MoveToOuterDisposeScope();
    }

    public void Merge(LoraLinear layer, string adapter) => layer.AddToBaseWeight(DeltaWeight(layer, adapter));

    public void Unmerge(LoraLinear layer, string adapter) => layer.AddToBaseWeight(DeltaWeight(layer, adapter).neg());

    public IEnumerable<(string key, Parameter tensor)> Tensors(LoraLinear layer, string adapter)
    {
        yield return (DiagonalKey, Diagonal(layer, adapter));
    }

    public IEnumerable<(string key, long[] shape)> Shapes(ILinearLayer baseLayer, int r)
    {
        CheckRank(baseLayer.in_features, baseLayer.out_features, r);
        yield return (DiagonalKey, [r]);
    }
}
