using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// A residual add and the RMSNorm of its sum as one CUDA kernel each way (inputs: x, a, weight; outputs: h = x + a and
/// y = weight · cast(h · rstd)). Backward: x and a both get dh + the norm's dx (one kernel, one rounding each as autograd's
/// accumulation of the two), the weight its dw. Without a (null), h is a view of x: x's gradient from h's later uses and
/// the norm's are then added in the norm's backward kernel instead of by autograd. Forward: lh_rms_block_fwd_res (a
/// block per row, fused.cu's layout); backward: the row kernels (<see cref="RmsNormKernels"/>). Where they do not apply
/// (rows not a whole number of 16-byte packs, unaligned tensors, LORAHUB_RMSNORM_ROWS_KERNEL=0) the add is a tensor op
/// and the norm fused.cu's kernels.
/// </summary>
/// <remarks>
/// x and a get the same gradient tensor, as autograd's AddBackward gives both inputs of an add: libtorch's engine
/// accumulates in place only into a buffer it holds the last reference to, and AccumulateGrad clones a gradient that is
/// referenced elsewhere, so neither input's gradient can change the other's.
/// </remarks>
internal sealed class AddRmsNormFunction(double eps) : CustomFunction
{
    private Tensor? h, w, rstd;

    protected override string name => "add_rms_norm";

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        var xc = inputs[0]!.contiguous();
        var ac = inputs[1]?.contiguous();
        var wc = inputs[2]!.contiguous();
        var cols = xc.size(-1);
        var rows = xc.numel() / cols;
        var y = empty_like(xc);
        var r = empty([rows], ScalarType.Float32, xc.device);
        Tensor sum;
        if (ac is null)
        {
            // No residual: the sum is x itself (a view: no copy), only so that its gradient reaches backward here.
            sum = xc.alias();
            FusedKernels.RmsNormForward(xc, wc, y, r, rows, cols, (float)eps);
        }
        else
        {
            sum = empty_like(xc);
            if (RmsNormKernels.ForwardRows && RmsNormKernels.Applies(xc, cols, xc, ac, wc, y, sum))
            {
                RmsNormKernels.Forward(xc, ac, wc, y, sum, r, rows, cols, (float)eps);
            }
            else if (RmsNormKernels.BlockApplies(xc, cols, xc, ac, wc, y, sum))
            {
                RmsNormKernels.BlockResidualForward(xc, ac, wc, y, sum, r, rows, cols, (float)eps);
            }
            else
            {
                sum.Dispose();
                sum = xc + ac;
                FusedKernels.RmsNormForward(sum, wc, y, r, rows, cols, (float)eps);
            }
        }
        h = save(sum);
        w = save(wc);
        rstd = save(r);
        return [sum, y];
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        var dh = grad_outputs[0].to(h!.dtype).contiguous();
        var dy = grad_outputs[1].to(h.dtype).contiguous();
        var cols = h.size(-1);
        var rows = h.numel() / cols;
        var dx = empty_like(h);
        var dw = needs_input_grad(2) ? empty_like(w!) : null;
        FusedKernels.RmsNormBackward(dy, h, w!, rstd!, dh, dx, dw, rows, cols);
        return [dx, dx, dw];
    }
}
