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
            /// Default of <see cref="chunked_cross_entropy"/>'s <c>recompute</c>: false (the fused path) unless the environment
            /// sets <c>LORAHUB_CE=recompute</c>. Settable (e.g. by a benchmark comparing the two).
            /// </summary>
            public static bool RecomputeCrossEntropyLogits { get; set; } =
                string.Equals(Environment.GetEnvironmentVariable("LORAHUB_CE"), "recompute", StringComparison.OrdinalIgnoreCase);

            /// <summary>
            /// Rows per chunk that the models' losses pass to <see cref="chunked_cross_entropy"/>: 1024 unless the environment
            /// sets LORAHUB_CE_CHUNK (a positive integer; for measuring how the chunk's size trades the lm_head GEMMs' efficiency
            /// against the chunk's logits staying in L2). Settable.
            /// </summary>
            public static long CrossEntropyChunk { get; set; } =
                long.TryParse(Environment.GetEnvironmentVariable("LORAHUB_CE_CHUNK"), out var rows) && rows > 0 ? rows : 1024;

            /// <summary>
            /// Mean cross-entropy of (hidden · weightᵀ) against labels without materialising the logits of all rows: rows are
            /// processed chunk by chunk, softmax and loss in fp32 (fp64 stays fp64), so the extra memory is one chunk of logits
            /// instead of the whole (tokens × vocab) matrix. hidden (N, D), weight (V, D), labels (N); labels equal to
            /// <paramref name="ignore_index"/> add no loss. Differentiable in hidden and weight.
            /// </summary>
            /// <remarks>
            /// Two ways to get the gradients. Fused (the default, Liger's fused linear cross-entropy idea): when a gradient
            /// is wanted, each chunk's gradient with respect to hidden (and weight, accumulated in fp32, when it requires
            /// grad) is computed in the forward pass right after its logits, so backward only scales the kept gradient by
            /// the upstream one: two vocabulary-sized GEMMs per chunk instead of three, and no second softmax. It keeps an
            /// (N, D) gradient in hidden's dtype from forward to backward (the recompute variant keeps hidden, the same
            /// size) and, when the weight trains, the (V, D) fp32 weight gradient, which the recompute variant allocates
            /// only in backward: in a training step, where backward follows the loss, the peak is the same; it differs
            /// when more is computed between this loss and its backward (several losses, then one backward).
            /// <paramref name="recompute"/> true (or <see cref="RecomputeCrossEntropyLogits"/>) keeps only the inputs and
            /// recomputes every chunk's logits in backward (one more GEMM per chunk).
            /// <para>On CUDA (fp32, fp16, bf16) the fused path's per-chunk softmax, loss and gradient are one NVRTC kernel
            /// (<see cref="CrossEntropyKernels"/>): it reads the logits in their dtype, keeps each row's max and sum of
            /// exponentials in fp32, writes each row's loss (fp32) and, with a gradient, softmax − onehot(label) over the
            /// logits in place (the label's column from fp32 as p − 1). Three passes over a chunk's logits instead of the
            /// tensor ops' seven (casts to and from fp32, log_softmax, exp, scatter) and no fp32 copy of the chunk: on an H200
            /// with a 128,256-token vocabulary ~0.19 ms instead of ~1.3 ms per 1024-row chunk, about 1 GiB less peak
            /// memory. A label outside [0, vocabulary) (other than <paramref name="ignore_index"/>) gives a NaN loss there
            /// instead of an error. CPU, fp64 and LORAHUB_CE_KERNEL=0 use the tensor ops.</para>
            /// </remarks>
            public static Tensor chunked_cross_entropy(Tensor hidden, Tensor weight, Tensor labels, long chunk_size = 1024, long ignore_index = -100,
                bool? recompute = null)
            {
                if (hidden.dim() != 2 || weight.dim() != 2 || labels.dim() != 1)
                    throw new ArgumentException("chunked cross-entropy expects hidden (N, D), weight (V, D), labels (N); got " +
                        $"hidden [{string.Join(", ", hidden.shape)}], weight [{string.Join(", ", weight.shape)}], labels [{string.Join(", ", labels.shape)}]");
                if (hidden.size(0) != labels.size(0))
                    throw new ArgumentException($"hidden and labels must have the same number of rows ({hidden.size(0)} vs {labels.size(0)})");
                if (hidden.size(1) != weight.size(1))
                    throw new ArgumentException($"hidden size {hidden.size(1)} does not match the head's {weight.size(1)}");
                if (chunk_size <= 0) throw new ArgumentOutOfRangeException(nameof(chunk_size), "chunk size must be positive");
                return recompute ?? RecomputeCrossEntropyLogits
                    ? Guard(() => new ChunkedCrossEntropyFunction(chunk_size, ignore_index).apply(hidden, weight, labels)[0])
                    : Guard(() => new FusedLinearCrossEntropyFunction(chunk_size, ignore_index).apply(hidden, weight, labels)[0]);
            }
        }
    }
}

/// <summary>
/// Recompute variant of <see cref="torchx.nn.functional.chunked_cross_entropy"/>: keeps the inputs and recomputes every
/// chunk's logits in backward. One instance per call.
/// </summary>
internal sealed class ChunkedCrossEntropyFunction(long chunk, long ignoreIndex) : CustomFunction
{
    private Tensor? hidden, weight, labels, count;

    protected override string name => "chunked_cross_entropy";

    // Logits are computed in fp32 (fp64 stays fp64, for gradient checks).
    internal static ScalarType Accumulate(Tensor t) => t.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;

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

/// <summary>
/// Fused variant of <see cref="torchx.nn.functional.chunked_cross_entropy"/>: the gradients are made in forward, chunk by
/// chunk, right after each chunk's logits; backward scales them by the upstream gradient. One instance per call.
/// </summary>
internal sealed class FusedLinearCrossEntropyFunction(long chunk, long ignoreIndex) : CustomFunction
{
    private Tensor? gradHidden, gradWeight;
    private ScalarType weightType;

    protected override string name => "fused_linear_cross_entropy";

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        var (h, w, y) = (inputs[0]!, inputs[1]!, inputs[2]!);
        bool wantHidden = needs_input_grad(0), wantWeight = needs_input_grad(1);
        var acc = ChunkedCrossEntropyFunction.Accumulate(h);
        var n = h.size(0);
        var valid = y.ne(ignoreIndex);
        var count = valid.sum().clamp_min(1).to(acc);
        var dh = wantHidden ? empty_like(h) : null;
        var dw = wantWeight ? zeros(w.shape, acc, w.device) : null;
        // The 1/count of the mean and the ignored rows' zeros scale rows: applied on the (len, D) side, not (len, V), with
        // factors made once for all rows.
        var rowScale = dh is null ? null : valid.unsqueeze(1).to(acc).div_(count);
        var keep = dw is null ? null : valid.unsqueeze(1).to(h.dtype);
        // On CUDA the cross-entropy of a chunk is one kernel (CrossEntropyKernels: 3 passes over the chunk's logits, in
        // place, instead of the tensor ops' casts, log_softmax, exp and scatter); per-row losses (fp32) summed once at the end.
        var kernel = CrossEntropyKernels.Applies(h, w, y);
        var labels64 = kernel ? (y.dtype == ScalarType.Int64 ? y.contiguous() : y.to(ScalarType.Int64).contiguous()) : null;
        var rowLoss = kernel ? empty([n], ScalarType.Float32, h.device) : null;
        var total = kernel ? null : zeros([], acc, h.device);
        for (long start = 0; start < n; start += chunk)
        {
            using var inner = NewDisposeScope();
            var len = Math.Min(chunk, n - start);
            var hc = h.narrow(0, start, len);
            var logits = torch.nn.functional.linear(hc, w);
            Tensor gi;
            if (kernel)
            {
                // Loss of every row into rowLoss; with a gradient, softmax − onehot written over the logits (their dtype).
                if (!logits.is_contiguous()) logits = logits.contiguous();
                CrossEntropyKernels.Forward(logits, labels64!.narrow(0, start, len), ignoreIndex, rowLoss!.narrow(0, start, len), dh is not null || dw is not null);
                if (dh is null && dw is null) continue;
                gi = logits;
            }
            else
            {
                var (yc, vc) = (y.narrow(0, start, len), valid.narrow(0, start, len));
                var safe = where(vc, yc, zeros_like(yc)).unsqueeze(1);
                // log-softmax straight from the GEMM's output into fp32 (one pass); the loss needs only the labels' column.
                var logp = torch.special.log_softmax(logits, -1, acc);
                logits.Dispose(); // one chunk of logits in the inputs' dtype less at the peak below
                var target = logp.gather(1, safe);
                total!.sub_(target.squeeze(1).masked_fill(vc.logical_not(), 0).sum());
                if (dh is null && dw is null) continue;
                // d loss / d logits = softmax − onehot(label): softmax in place over the log-probabilities, the labels' column
                // written as p − 1 from its fp32 value (p − 1 in bf16 would lose the gradient of confident predictions).
                var g = logp.exp_();
                g.scatter_(1, safe, target.exp().sub_(1));
                gi = g.to(h.dtype);
            }
            dh?.narrow(0, start, len).copy_(gi.mm(w).mul_(rowScale!.narrow(0, start, len)));
            // In the inputs' dtype (bf16 tensor cores on GPU), accumulated across chunks in fp32; 1/count applied there
            // once (in bf16 it would scale the whole gradient by a rounded factor).
            dw?.add_(gi.t().mm(hc.mul(keep!.narrow(0, start, len))));
        }
        var sum = rowLoss?.sum() ?? total!;
        dw?.div_(count);
        gradHidden = dh is null ? null : save(dh);
        gradWeight = dw is null ? null : save(dw);
        weightType = w.dtype;
        return [sum.div_(count)];
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        var upstream = grad_outputs[0];
        // Scaled in place (no copy); returned as new handles on the same storage, since the saved ones are freed after backward.
        var dh = gradHidden?.mul_(upstream.to(gradHidden.dtype)).detach();
        var dw = gradWeight is null ? null
            : weightType == gradWeight.dtype ? gradWeight.mul_(upstream.to(gradWeight.dtype)).detach()
            : gradWeight.mul_(upstream.to(gradWeight.dtype)).to(weightType);
        return [dh, dw, null];
    }
}
