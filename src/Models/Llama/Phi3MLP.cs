using TorchSharp;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace LoRAHub.Models.Llama;

/// <summary>
/// Phi-3's feed-forward: one gate_up_proj Linear whose output halves are gate and up, then down(act(gate) · up). The
/// fused Linear is one module, as transformers and PEFT see it (PEFT targets "gate_up_proj" whole).
/// </summary>
public sealed class Phi3MLP : Module<Tensor, Tensor>
{
    private readonly string activation;
    private Module<Tensor, Tensor> gate_up_proj, down_proj;

    public Phi3MLP(LlamaConfig config, ScalarType dtype, Device device) : base(nameof(Phi3MLP))
    {
        activation = config.Activation;
        gate_up_proj = Linear(config.HiddenSize, 2L * config.IntermediateSize, config.MlpBias, device, dtype);
        down_proj = Linear(config.IntermediateSize, config.HiddenSize, config.MlpBias, device, dtype);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var halves = gate_up_proj.call(x).chunk(2, -1);
        var h = GatedActivation.Apply(activation, halves[0], halves[1]);
        return down_proj.call(h).MoveToOuterDisposeScope();
    }
}
