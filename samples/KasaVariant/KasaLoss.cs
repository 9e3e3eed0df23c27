using LoRAHub.Tuners.Lora;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Samples.KasaVariant;

/// <summary>
/// PEFT's LoraModel._get_kasa_loss: the paper's auxiliary regularizers summed over the KaSA layers of one adapter,
/// Σ_layers β·Σ lora_diag² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F), in fp32. Add it to the task loss when training
/// (without it the SVD reading of the update is only approximate).
/// </summary>
public static class KasaLoss
{
    /// <summary>The regularization of <paramref name="adapterName"/> (default: the active adapter); 0 without KaSA layers.</summary>
    public static Tensor Compute(LoraAdapter adapter, string? adapterName = null)
    {
        var name = adapterName ?? adapter.ActiveAdapter;
        var config = adapter.OptionsOf(name) is KasaOptions kasa ? kasa.KasaConfig
            : throw new ArgumentException($"adapter '{name}' is not a KaSA adapter");
        using var scope = NewDisposeScope();
        Tensor? total = null;
        foreach (var layer in adapter.Layers.Values.Where(l => l.HasAdapter(name) && l.Variant(name) is KasaLinearVariant))
        {
            var diag = KasaLinearVariant.Diagonal(layer, name).to(ScalarType.Float32);
            var a = layer.A(name).to(ScalarType.Float32);
            var b = layer.B(name).to(ScalarType.Float32);
            var eye = torch.eye(diag.shape[0], dtype: ScalarType.Float32, device: diag.device);
            var l2 = diag.pow(2).sum();
            var l3 = linalg.norm(b.t().matmul(b).sub(eye)).add(linalg.norm(a.matmul(a.t()).sub(eye)));
            var term = l2.mul(config.Beta).add(l3.mul(config.Gamma));
            total = total is null ? term : total.add(term);
        }
        return (total ?? torch.zeros([], ScalarType.Float32)).MoveToOuterDisposeScope();
    }
}
