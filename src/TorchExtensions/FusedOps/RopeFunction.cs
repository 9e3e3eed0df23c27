using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// Rotary embedding as one CUDA kernel each way (inputs: x (B, H, T, D), cos, sin as contiguous fp32 (T, D)). x may be
/// any view with unit stride along D (q and k arrive as transposed views of the projections); the output keeps x's layout.
/// </summary>
internal sealed class RopeFunction : CustomFunction
{
    private Tensor? cos, sin;

    protected override string name => "rotary_embedding";

    private static Tensor UnitLastStride(Tensor t) => t.stride(-1) == 1 ? t : t.contiguous();

    // A tensor whose strides the kernel can write through: x's own layout when it is dense, else contiguous.
    private static Tensor OutputLike(Tensor t) =>
        KernelTensors.IsNonOverlappingAndDense(t) ? empty_like(t) : empty(t.shape, t.dtype, t.device);

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        var x = UnitLastStride(inputs[0]!);
        var y = OutputLike(x);
        cos = save(inputs[1]!);
        sin = save(inputs[2]!);
        FusedKernels.Rope(x, y, cos, sin, backward: false);
        return [y];
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        var dy = UnitLastStride(grad_outputs[0]);
        var dx = OutputLike(dy);
        FusedKernels.Rope(dy, dx, cos!, sin!, backward: true);
        return [dx, null, null];
    }
}
