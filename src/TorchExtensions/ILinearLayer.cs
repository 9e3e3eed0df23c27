using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// A module computing y = x·Wᵀ + b, however W is stored: dense (TorchSharp's Linear, seen through
/// <see cref="LinearLayer.From"/>) or quantized (Linear4bit), or transposed (GPT-2's Conv1D).
/// Adapter layers (LoRA, DoRA, QLoRA) wrap any of them through this interface.
/// </summary>
public interface ILinearLayer
{
    long in_features { get; }
    long out_features { get; }
    Tensor? bias { get; }

    /// <summary>Device of the stored weight.</summary>
    Device weight_device { get; }

    /// <summary>The dtype dense computations with W use: the weight's dtype, or the compute dtype of a quantized layer.</summary>
    ScalarType weight_dtype { get; }

    /// <summary>W (out×in) in <see cref="weight_dtype"/>: the parameter itself for Linear, a new dequantized tensor otherwise.</summary>
    Tensor dense_weight();

    /// <summary>W += delta in place (a quantized layer dequantizes, adds and quantizes again).</summary>
    void add_to_weight_(Tensor delta);
}
