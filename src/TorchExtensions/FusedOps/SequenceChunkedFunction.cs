using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    public static partial class utils
    {
        /// <summary>
        /// f over x in chunks of <paramref name="chunk_size"/> positions along <paramref name="dim"/> (the sequence: by default
        /// the dimension before the features), forward and backward — a tiled MLP, as DeepSpeed's TiledMLP: for an f that
        /// treats every position on its own, e.g. a transformer's MLP, whose intermediate tensors (tokens × intermediate)
        /// would otherwise exist whole. f takes x.narrow(dim, start, n) and returns a tensor of that size along dim (other
        /// dimensions as it likes, the same for every chunk); the results are joined along dim. Other dimensions (the batch)
        /// stay whole, so an f that routes batch rows (mixed-adapter batches) sees its rows as usual.
        /// </summary>
        /// <remarks>
        /// With grad on, only x is kept: backward runs f again chunk by chunk under enable_grad and backpropagates each chunk
        /// at once, so parameters inside f get their gradients accumulated chunk by chunk (as in <see cref="checkpoint"/>)
        /// and f's activations exist for one chunk at a time. The price is one more forward of f. Without grad, f simply
        /// runs chunk by chunk into one output. A chunk size at or above the dimension's size calls f once on all of x.
        /// <para>
        /// <paramref name="preserve_rng_state"/> (PyTorch checkpoint's name; pass false where f draws no random numbers,
        /// e.g. a model in eval mode): f must give the same result when run again with the same random numbers, so the
        /// CPU generator's state is restored for backward's recomputation, and for a CUDA input two seeds are drawn from
        /// the CPU generator, the CUDA generator seeded with the first before the chunks (in forward and again in backward)
        /// and with the second after them, as <see cref="checkpoint"/> does. The same happens without grad, so that a
        /// checkpoint's forward (no grad) and its recomputation (grad) draw the same dropout masks.
        /// </para>
        /// </remarks>
        public static Tensor sequence_chunked(Func<Tensor, Tensor> f, Tensor x, long chunk_size, int dim = -2, bool preserve_rng_state = true)
        {
            ArgumentNullException.ThrowIfNull(f);
            if (chunk_size <= 0) throw new ArgumentOutOfRangeException(nameof(chunk_size), chunk_size, "the chunk size must be positive");
            var d = dim < 0 ? dim + (int)x.dim() : dim;
            if (d < 0 || d >= x.dim()) throw new ArgumentOutOfRangeException(nameof(dim), dim, $"no dimension {dim} in a tensor of shape [{string.Join(", ", x.shape)}]");
            if (x.size(d) <= chunk_size) return f(x);
            if (!is_grad_enabled()) return SequenceChunkedFunction.RunSeeded(f, x, chunk_size, d, preserve_rng_state);
            return ApplyRecomputing(new SequenceChunkedFunction(f, chunk_size, d, preserve_rng_state), x, "sequence-chunked function");
        }
    }
}

/// <summary>The autograd function behind <see cref="torchx.utils.sequence_chunked"/>: one instance per call.</summary>
internal sealed class SequenceChunkedFunction(Func<Tensor, Tensor> f, long chunk, int dim, bool preserveRng) : CustomFunction
{
    private Tensor? input;
    private RngReplay? rng;

    protected override string name => "sequence_chunked";

    /// <summary>f over x, chunk positions along dim at a time, into one output (no autograd recorded).</summary>
    internal static Tensor Run(Func<Tensor, Tensor> f, Tensor x, long chunk, int dim)
    {
        using var scope = NewDisposeScope();
        var length = x.size(dim);
        Tensor? y = null;
        for (long start = 0; start < length; start += chunk)
        {
            var n = Math.Min(chunk, length - start);
            using var inner = NewDisposeScope(); // frees this chunk's activations before the next one runs
            var part = f(x.narrow(dim, start, n));
            if (part.dim() <= dim || part.size(dim) != n)
                throw new InvalidOperationException($"sequence_chunked: f must keep the size of dimension {dim} ({n}); it returned [{string.Join(", ", part.shape)}]");
            if (y is null)
            {
                var shape = part.shape;
                shape[dim] = length;
                y = empty(shape, part.dtype, part.device).MoveToOuterDisposeScope();
            }
            y.narrow(dim, start, n).copy_(part);
        }
        return y!.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// <see cref="Run"/> without autograd, with the CUDA generator seeded as the autograd function's forward seeds it (two
    /// seeds drawn from the CPU generator), so that both draw the same random numbers from the same CPU state.
    /// </summary>
    internal static Tensor RunSeeded(Func<Tensor, Tensor> f, Tensor x, long chunk, int dim, bool preserveRng)
    {
        if (!preserveRng || x.device_type != DeviceType.CUDA) return Run(f, x, chunk, dim);
        return RunRecorded(RngReplay.Start(x), f, x, chunk, dim);
    }

    // f over the chunks after rng's start, the CUDA generator seeded with rng's second seed afterwards.
    private static Tensor RunRecorded(RngReplay rng, Func<Tensor, Tensor> f, Tensor x, long chunk, int dim)
    {
        try
        {
            return Run(f, x, chunk, dim);
        }
        finally
        {
            rng.SeedAfter();
        }
    }

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        var x = inputs[0]!;
        input = save(x);
        if (!preserveRng) return [Run(f, x, chunk, dim)];
        rng = RngReplay.Start(x);
        return [RunRecorded(rng, f, x, chunk, dim)];
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        // On libtorch's autograd thread, inside CustomFunction's dispose scope. The chunks run in forward's order with the
        // RNG as it was there, so each chunk draws the same random numbers again (backward ops draw none).
        using var replay = rng?.Replay();
        var x = input!;
        var dy = grad_outputs[0];
        var dx = needs_input_grad(0) ? empty_like(x) : null;
        var length = x.size(dim);
        for (long start = 0; start < length; start += chunk)
        {
            var n = Math.Min(chunk, length - start);
            using var scope = NewDisposeScope(); // this chunk's activations and gradients go before the next chunk runs
            var xc = x.narrow(dim, start, n).detach().requires_grad_(true);
            using (enable_grad())
            {
                var yc = f(xc);
                if (!yc.requires_grad)
                    throw new InvalidOperationException("the chunked function's output does not depend on anything that requires grad");
                yc.backward([dy.narrow(dim, start, n)]);
            }
            if (dx is not null)
            {
                if (xc.grad is { } g) dx.narrow(dim, start, n).copy_(g);
                else dx.narrow(dim, start, n).zero_();
            }
        }
        return [dx];
    }
}
