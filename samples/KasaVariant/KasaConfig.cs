using System.Text.Json.Serialization;

namespace LoRAHub.Samples.KasaVariant;

/// <summary>
/// PEFT's KasaConfig, saved as adapter_config.json's "kasa_config" object: the weights of the paper's two auxiliary
/// regularizers, used only by <see cref="KasaLoss"/> (which a training loop adds to its loss, as with PEFT's _get_kasa_loss).
/// </summary>
public sealed class KasaConfig
{
    /// <summary>β of the singular-value penalty Σ lora_diag² (paper Eq. 9-10).</summary>
    [JsonPropertyName("beta")] public double Beta { get; set; } = 1e-4;

    /// <summary>γ of the orthogonality penalty ‖BᵀB − I‖_F + ‖AAᵀ − I‖_F (paper Eq. 11).</summary>
    [JsonPropertyName("gamma")] public double Gamma { get; set; } = 1e-3;
}
