using LoRAHub.TorchExtensions;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.DoRA;

/// <summary>
/// y = t + c·(t − bias) as one CUDA kernel forward and one pass plus a column reduce backward (inputs: t (…, cols), the
/// correction c (cols, any float dtype, used in fp32), a frozen bias (cols) or null). Keeps y rather than t for backward:
/// t − b = (y − b)/(1 + c), so the output-sized t is not kept alive by the graph.
/// </summary>
internal sealed class DoraOutputFunction : CustomFunction
{
    private Tensor? y, c32, bias;
    private ScalarType cType;

    protected override string name => "dora_output";

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        var x = inputs[0]!.contiguous();
        var c = inputs[1]!;
        cType = c.dtype;
        var c32Local = c.to(ScalarType.Float32).contiguous();
        var b = inputs[2] is { } bi ? bi.to(x.dtype).contiguous() : null;
        var output = empty(x.shape, x.dtype, x.device);
        var cols = x.size(-1);
        var rows = x.numel() / cols;
        DoraKernels.Forward(x, c32Local, b, output, rows, cols, DoraKernels.RowBlocks(x, rows, cols));
        y = save(output);
        c32 = save(c32Local);
        bias = b is null ? null : save(b);
        return [output];
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        var g = grad_outputs[0].to(y!.dtype).contiguous();
        var cols = y.size(-1);
        var rows = y.numel() / cols;
        var blocks = DoraKernels.RowBlocks(y, rows, cols);
        var gt = empty(y.shape, y.dtype, y.device);
        var partial = empty([blocks, cols], ScalarType.Float32, y.device);
        var gc = empty([cols], ScalarType.Float32, y.device);
        DoraKernels.Backward(g, y, c32!, bias, gt, partial, gc, rows, cols, blocks);
        return [gt, gc.dtype == cType ? gc : gc.to(cType), null];
    }
}
