using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Samples.KasaVariant;

/// <summary>
/// The layer's child "lora_diag": one learnable r-vector per adapter, registered under the adapter's name, so parameter
/// paths read "…q_proj.lora_diag.default" as PEFT's ParameterDict gives them.
/// </summary>
public sealed class KasaDiagonals : nn.Module
{
    public KasaDiagonals() : base(nameof(KasaDiagonals)) { }

    public Parameter this[string adapter] => _internal_params.TryGetValue(adapter, out var p) ? p
        : throw new KeyNotFoundException($"no KaSA diagonal for adapter '{adapter}'");

    /// <summary>Sets the adapter's diagonal; one it replaces is disposed.</summary>
    public void Set(string adapter, Parameter diagonal)
    {
        if (_internal_params.TryGetValue(adapter, out var old))
        {
            _internal_params.Remove(adapter);
            old.Dispose();
        }
        register_parameter(adapter, diagonal);
    }
}
