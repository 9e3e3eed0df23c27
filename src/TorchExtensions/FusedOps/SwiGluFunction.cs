using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>silu(gate) · up as one CUDA kernel each way (inputs: gate, up).</summary>
internal sealed class SwiGluFunction : CustomFunction
{
    private Tensor? g, u;

    protected override string name => "swiglu";

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        var gc = inputs[0]!.contiguous();
        var uc = inputs[1]!.contiguous();
        var y = empty_like(gc);
        FusedKernels.SwiGluForward(gc, uc, y);
        g = save(gc);
        u = save(uc);
        return [y];
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        var dy = grad_outputs[0].to(g!.dtype).contiguous();
        var dg = empty_like(g);
        var du = empty_like(u!);
        FusedKernels.SwiGluBackward(dy, g, u!, dg, du);
        return [dg, du];
    }
}
