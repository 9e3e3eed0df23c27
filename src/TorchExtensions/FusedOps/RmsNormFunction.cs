using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>RMSNorm over the last dimension with a weight, as one CUDA kernel each way (inputs: x, weight).</summary>
internal sealed class RmsNormFunction(double eps) : CustomFunction
{
    private Tensor? x, w, rstd;

    protected override string name => "rms_norm";

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        var xc = inputs[0]!.contiguous();
        var wc = inputs[1]!.contiguous();
        var cols = xc.size(-1);
        var rows = xc.numel() / cols;
        var y = empty_like(xc);
        var r = empty([rows], ScalarType.Float32, xc.device);
        FusedKernels.RmsNormForward(xc, wc, y, r, rows, cols, (float)eps);
        x = save(xc);
        w = save(wc);
        rstd = save(r);
        return [y];
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        var dy = grad_outputs[0].to(x!.dtype).contiguous();
        var cols = x.size(-1);
        var rows = x.numel() / cols;
        var dx = empty_like(x);
        var dw = needs_input_grad(1) ? empty_like(w!) : null;
        FusedKernels.RmsNormBackward(dy, x, w!, rstd!, null, dx, dw, rows, cols);
        return [dx, dw];
    }
}
