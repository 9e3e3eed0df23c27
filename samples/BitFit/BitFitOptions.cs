using LoRAHub.Tuners;

namespace LoRAHub.Samples.BitFit;

/// <summary>Which tensors BitFit trains; everything else stays frozen.</summary>
public sealed class BitFitOptions
{
    /// <summary>Train every parameter named "bias".</summary>
    [ConfigKey("train_biases")] public bool TrainBiases { get; set; } = true;

    /// <summary>Also train the weights of LayerNorm and RMSNorm modules.</summary>
    [ConfigKey("train_norms")] public bool TrainNorms { get; set; }
}
