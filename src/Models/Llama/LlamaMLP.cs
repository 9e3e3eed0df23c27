using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace LoRAHub.Models.Llama;

/// <summary>Gated feed-forward: down(act(gate(x)) · up(x)), SwiGLU (silu) or Gemma's GeGLU (tanh gelu).</summary>
public sealed class LlamaMLP : Module<Tensor, Tensor>
{
    private readonly string activation;
    private Module<Tensor, Tensor> gate_proj, up_proj, down_proj;

    public LlamaMLP(LlamaConfig config, ScalarType dtype, Device device) : base(nameof(LlamaMLP))
    {
        activation = config.Activation;
        gate_proj = Linear(config.HiddenSize, config.IntermediateSize, config.MlpBias, device, dtype);
        up_proj = Linear(config.HiddenSize, config.IntermediateSize, config.MlpBias, device, dtype);
        down_proj = Linear(config.IntermediateSize, config.HiddenSize, config.MlpBias, device, dtype);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        // The fused LoRA block where it is exact (torchx.nn.functional.Fused.LoraMlp); it records the path taken.
        if (LoraFusion.TryMlp(this, activation, gate_proj, up_proj, down_proj, x) is { } fused) return fused;
        using var scope = NewDisposeScope();
        var h = GatedActivation.Apply(activation, gate_proj.call(x), up_proj.call(x));
        return down_proj.call(h).MoveToOuterDisposeScope();
    }
}
