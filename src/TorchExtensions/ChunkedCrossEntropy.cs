using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    public static partial class nn
    {
        public static partial class functional
        {
            /// <summary>
            /// Mean cross-entropy of (hidden · weightᵀ) against labels without materialising all logits: rows are
            /// processed chunk by chunk in fp32 (fp64 stays fp64) and recomputed in backward, so peak extra memory is one
            /// chunk of logits instead of the whole (tokens × vocab) fp32 matrix. hidden (N, D), weight (V, D), labels (N);
            /// labels equal to <paramref name="ignore_index"/> add no loss. Differentiable in hidden and weight.
            /// </summary>
            public static Tensor chunked_cross_entropy(Tensor hidden, Tensor weight, Tensor labels, long chunk_size = 1024, long ignore_index = -100)
            {
                if (hidden.dim() != 2 || weight.dim() != 2 || labels.dim() != 1)
                    throw new ArgumentException("chunked cross-entropy expects hidden (N, D), weight (V, D), labels (N); got " +
                        $"hidden [{string.Join(", ", hidden.shape)}], weight [{string.Join(", ", weight.shape)}], labels [{string.Join(", ", labels.shape)}]");
                if (hidden.size(0) != labels.size(0))
                    throw new ArgumentException($"hidden and labels must have the same number of rows ({hidden.size(0)} vs {labels.size(0)})");
                if (hidden.size(1) != weight.size(1))
                    throw new ArgumentException($"hidden size {hidden.size(1)} does not match the head's {weight.size(1)}");
                if (chunk_size <= 0) throw new ArgumentOutOfRangeException(nameof(chunk_size), "chunk size must be positive");
                return ChunkedCrossEntropyFunction.apply(hidden, weight, labels, chunk_size, ignore_index);
            }
        }
    }
}

/// <summary>The custom autograd function behind <see cref="torchx.nn.functional.chunked_cross_entropy"/>.</summary>
internal sealed class ChunkedCrossEntropyFunction : autograd.SingleTensorFunction<ChunkedCrossEntropyFunction>
{
    public override string Name => "ChunkedCrossEntropy";

    // Logits are computed in fp32 (fp64 stays fp64, for gradient checks).
    private static ScalarType Accumulate(Tensor t) => t.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;

    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        var (hidden, weight, labels) = ((Tensor)vars[0], (Tensor)vars[1], (Tensor)vars[2]);
        var (chunk, ignore) = ((long)vars[3], (long)vars[4]);
        using var scope = NewDisposeScope();
        var acc = Accumulate(hidden);
        var n = hidden.size(0);
        var count = labels.ne(ignore).sum().clamp_min(1).to(acc);
        var total = zeros([], acc, hidden.device);
        for (long start = 0; start < n; start += chunk)
        {
            using var inner = NewDisposeScope();
            var len = Math.Min(chunk, n - start);
            var logits = hidden.narrow(0, start, len).matmul(weight.t()).to(acc);
            total.add_(torch.nn.functional.cross_entropy(logits, labels.narrow(0, start, len), ignore_index: ignore, reduction: torch.nn.Reduction.Sum));
        }
        ctx.save_for_backward([hidden, weight, labels, count.DetachFromDisposeScope()]);
        ctx.save_data("chunk", chunk);
        ctx.save_data("ignore_index", ignore);
        return total.div_(count).MoveToOuterDisposeScope();
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad_output)
    {
        // Runs on libtorch's autograd thread (the device thread on CUDA), outside the caller's dispose scope.
        using var scope = NewDisposeScope();
        var saved = ctx.get_saved_variables();
        var (hidden, weight, labels, count) = (saved[0], saved[1], saved[2], saved[3]);
        var chunk = (long)ctx.get_data("chunk");
        var ignore = (long)ctx.get_data("ignore_index");
        var acc = Accumulate(hidden);
        var upstream = grad_output.to(acc).div(count);
        var gradHidden = empty_like(hidden);
        var gradWeight = zeros(weight.shape, acc, weight.device);
        var n = hidden.size(0);
        for (long start = 0; start < n; start += chunk)
        {
            using var inner = NewDisposeScope();
            var len = Math.Min(chunk, n - start);
            var h = hidden.narrow(0, start, len);
            var y = labels.narrow(0, start, len);
            // d loss / d logits = softmax(logits) − onehot(label), zero on ignored rows, times the upstream scale.
            var probs = h.matmul(weight.t()).to(acc).softmax(-1);
            var valid = y.ne(ignore);
            var safe = where(valid, y, zeros_like(y));
            probs.scatter_add_(1, safe.unsqueeze(1), full([len, 1], -1.0, acc, probs.device));
            probs.mul_(valid.unsqueeze(1).to(acc).mul(upstream));
            var g = probs.to(hidden.dtype);
            gradHidden.narrow(0, start, len).copy_(g.matmul(weight));
            // In the inputs' dtype (bf16 tensor cores on GPU), accumulated across chunks in fp32.
            gradWeight.add_(g.t().matmul(h));
        }
        var result = new List<Tensor> { gradHidden.DetachFromDisposeScope(), gradWeight.to(weight.dtype).DetachFromDisposeScope(), null!, null!, null! };
        return result;
    }
}
