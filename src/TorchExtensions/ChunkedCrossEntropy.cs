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
                return Guard(() => new ChunkedCrossEntropyFunction(chunk_size, ignore_index).apply(hidden, weight, labels)[0]);
            }
        }
    }
}

/// <summary>The custom autograd function behind <see cref="torchx.nn.functional.chunked_cross_entropy"/>: one instance per call.</summary>
internal sealed class ChunkedCrossEntropyFunction(long chunk, long ignoreIndex) : CustomFunction
{
    private Tensor? hidden, weight, labels, count;

    protected override string name => "chunked_cross_entropy";

    // Logits are computed in fp32 (fp64 stays fp64, for gradient checks).
    private static ScalarType Accumulate(Tensor t) => t.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        var (h, w, y) = (inputs[0]!, inputs[1]!, inputs[2]!);
        var acc = Accumulate(h);
        var n = h.size(0);
        var valid = y.ne(ignoreIndex).sum().clamp_min(1).to(acc);
        var total = zeros([], acc, h.device);
        for (long start = 0; start < n; start += chunk)
        {
            using var inner = NewDisposeScope();
            var len = Math.Min(chunk, n - start);
            var logits = torch.nn.functional.linear(h.narrow(0, start, len), w).to(acc); // not matmul: see torchx.matmul
            total.add_(torch.nn.functional.cross_entropy(logits, y.narrow(0, start, len), ignore_index: ignoreIndex, reduction: torch.nn.Reduction.Sum));
        }
        (hidden, weight, labels, count) = (save(h), save(w), save(y), save(valid));
        return [total.div_(valid)];
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        var (h, w, y) = (hidden!, weight!, labels!);
        bool wantHidden = needs_input_grad(0), wantWeight = needs_input_grad(1);
        var acc = Accumulate(h);
        var upstream = grad_outputs[0].to(acc).div(count!);
        var gradHidden = wantHidden ? empty_like(h) : null;
        var gradWeight = wantWeight ? zeros(w.shape, acc, w.device) : null;
        var n = h.size(0);
        for (long start = 0; start < n; start += chunk)
        {
            using var inner = NewDisposeScope();
            var len = Math.Min(chunk, n - start);
            var hc = h.narrow(0, start, len);
            var yc = y.narrow(0, start, len);
            // d loss / d logits = softmax(logits) − onehot(label), zero on ignored rows, times the upstream scale.
            var probs = torch.nn.functional.linear(hc, w).to(acc).softmax(-1);
            var valid = yc.ne(ignoreIndex);
            var safe = where(valid, yc, zeros_like(yc));
            probs.scatter_add_(1, safe.unsqueeze(1), full([len, 1], -1.0, acc, probs.device));
            probs.mul_(valid.unsqueeze(1).to(acc).mul(upstream));
            var g = probs.to(h.dtype);
            gradHidden?.narrow(0, start, len).copy_(g.mm(w));
            // In the inputs' dtype (bf16 tensor cores on GPU), accumulated across chunks in fp32.
            gradWeight?.add_(g.t().mm(hc));
        }
        return [gradHidden, gradWeight?.to(w.dtype), null];
    }
}
