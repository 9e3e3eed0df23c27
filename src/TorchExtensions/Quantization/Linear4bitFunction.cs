using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Quantization;

/// <summary>
/// y = x·Wᵀ with W (out×in) stored in 4 bits. Forward dequantizes W into a temporary in x's dtype and frees it; backward
/// dequantizes again for grad_x = grad·W. W is frozen (no weight gradient) and x is not needed, so autograd keeps only
/// the quantized weight alive: a dequantized weight never outlives the call that made it.
/// </summary>
internal sealed class Linear4bitFunction(FourBitTensor w, long outFeatures, long inFeatures) : CustomFunction
{
    protected override string name => "Linear4bit";

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        var x = inputs[0]!;
        var weight = w.Dequantize(x.dtype).view(outFeatures, inFeatures);
        return [torch.nn.functional.linear(x, weight)];
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        if (!needs_input_grad(0)) return [null];
        var grad = grad_outputs[0];
        var weight = w.Dequantize(grad.dtype).view(outFeatures, inFeatures);
        return [grad.matmul(weight)];
    }
}
