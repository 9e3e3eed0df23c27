using LoRAHub.Torch;
using LoRAHub.Torch.NN;

namespace LoRAHub.Models.Gpt2;

/// <summary>
/// transformers' Conv1D: a linear layer whose weight is stored (in, out), i.e. transposed from Linear, computing
/// x·W + b. Kept in that layout so GPT-2 checkpoints load as they are (PEFT calls this fan_in_fan_out).
/// </summary>
public sealed class Conv1D : Module
{
    public Conv1D(long inFeatures, long outFeatures, ScalarType dtype, Device device) : base("Conv1D")
    {
        register_parameter("weight", torch.empty([inFeatures, outFeatures], dtype, device).normal_(0, 0.02));
        register_parameter("bias", torch.zeros([outFeatures], dtype, device));
    }

    public Tensor weight => Parameter("weight");
    public Tensor bias => Parameter("bias");
    public long in_features => weight.size(0);
    public long out_features => weight.size(1);

    public override Tensor forward(Tensor input)
    {
        using var wt = weight.t();
        return torch.nn.functional.linear(input, wt, bias);
    }
}
