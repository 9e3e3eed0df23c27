using LoRAHub.TorchExtensions;
using static TorchSharp.torch;

namespace LoRAHub.Models.Llama;

/// <summary>act(gate) · up, the gated MLP's middle: SwiGLU (silu) for Llama, Qwen, Phi-3, Mixtral; GeGLU (tanh gelu) for Gemma.</summary>
public static class GatedActivation
{
    public static Tensor Apply(string activation, Tensor gate, Tensor up)
    {
        switch (activation)
        {
            case "silu":
                return torchx.nn.functional.swiglu(gate, up);
            case "gelu_pytorch_tanh" or "gelu_new":
            {
                using var scope = NewDisposeScope();
                return (nn.functional.gelu(gate, TorchSharp.Modules.GELU.Approximate.tanh) * up).MoveToOuterDisposeScope();
            }
            case "gelu":
            {
                using var scope = NewDisposeScope();
                return (nn.functional.gelu(gate) * up).MoveToOuterDisposeScope();
            }
            default:
                throw new NotSupportedException($"activation '{activation}' is not supported (silu, gelu_pytorch_tanh, gelu, gelu_new)");
        }
    }
}
