using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    public static partial class utils
    {
        /// <summary>
        /// Activation checkpointing (torch.utils.checkpoint): runs f(x) without keeping its activations and recomputes
        /// them during backward, trading compute for memory. Only x is kept. f must not dispose x, and must give the same
        /// result when run again with the same random numbers: the RNG is reproduced for the recomputation.
        /// </summary>
        /// <remarks>
        /// RNG: the CPU generator's state is saved before f and restored for the recomputation (then put back). The CUDA
        /// generator's state cannot be read through TorchSharp, so for a CUDA input two seeds are drawn from the CPU
        /// generator before f: the CUDA generator is seeded with the first before f runs and again before the
        /// recomputation (dropout masks repeat exactly), and with the second after it, so later random numbers do not
        /// repeat those used inside f. Consequences: a checkpointed CUDA run uses different (equally seeded, reproducible)
        /// random numbers than the same model run without checkpointing, and the seeding applies to the current CUDA device.
        /// Errors: an exception thrown by f in forward becomes a <see cref="TorchException"/>; one thrown during backward's
        /// recomputation cannot cross libtorch's autograd engine, so backward() fails with a libtorch error that
        /// <see cref="TorchErrors.Translate"/> (or <see cref="Guard(Action)"/> around backward()) turns into a
        /// <see cref="TorchException"/> whose inner exception is f's. Memory: built on <see cref="CustomFunction"/>, so
        /// no copy of the output is kept, the saved input is freed right after backward and the input gradient as soon
        /// as libtorch has taken it.
        /// </remarks>
        public static Tensor checkpoint(Func<Tensor, Tensor> f, Tensor x)
        {
            ArgumentNullException.ThrowIfNull(f);
            if (!is_grad_enabled()) return f(x);
            // The input must require grad, or autograd never calls backward and parameters inside f get no gradient.
            var input = x.requires_grad ? x : x.detach().requires_grad_(true);
            try
            {
                return new CheckpointFunction(f).apply(input)[0];
            }
            catch (ExternalException e)
            {
                throw TorchErrors.Translate(e);
            }
            catch (Exception e) when (e is not TorchException)
            {
                throw new TorchException(TorchErrorKind.Generic, $"checkpointed function failed: {e.Message}", e);
            }
            finally
            {
                if (!ReferenceEquals(input, x)) input.Dispose();
            }
        }
    }
}

/// <summary>The custom autograd function behind <see cref="torchx.utils.checkpoint"/>: one instance per call.</summary>
internal sealed class CheckpointFunction(Func<Tensor, Tensor> f) : CustomFunction
{
    private Tensor? input;
    private byte[] cpuRngState = [];
    private bool cuda;
    private long cudaSeed, cudaSeedAfter;

    protected override string name => "checkpoint";

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        var x = inputs[0]!;
        cuda = x.device_type == DeviceType.CUDA;
        if (cuda)
        {
            using var seeds = randint(0, long.MaxValue, [2], ScalarType.Int64);
            var values = seeds.data<long>().ToArray();
            (cudaSeed, cudaSeedAfter) = (values[0], values[1]);
        }
        cpuRngState = RngState.Get();
        if (cuda) torch.cuda.manual_seed(cudaSeed);
        input = save(x);
        var y = f(x);
        return [ReferenceEquals(y, x) ? x.alias() : y]; // never hand the caller's own tensor to the graph as an output
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        // Runs on libtorch's autograd thread (the device thread on CUDA), inside CustomFunction's dispose scope.
        var current = RngState.Get();
        RngState.Set(cpuRngState);
        if (cuda) torch.cuda.manual_seed(cudaSeed);
        var x = input!.detach().requires_grad_(true);
        try
        {
            using var grad = enable_grad();
            var output = f(x);
            if (!output.requires_grad)
                throw new InvalidOperationException("the checkpointed function's output does not depend on anything that requires grad");
            output.backward([grad_outputs[0]]);
        }
        finally
        {
            RngState.Set(current);
            if (cuda) torch.cuda.manual_seed(cudaSeedAfter);
        }
        return [x.grad?.detach()];
    }
}

/// <summary>The CPU generator's state as bytes, so it needs no tensor lifetime management across forward and backward.</summary>
internal static class RngState
{
    public static byte[] Get()
    {
        using var state = torch.random.get_rng_state();
        return state.data<byte>().ToArray();
    }

    public static void Set(byte[] bytes)
    {
        using var state = tensor(bytes, ScalarType.Byte);
        torch.random.set_rng_state(state);
    }
}

/// <summary>
/// Exceptions thrown in a C# backward (checkpoint recomputations, <see cref="CustomFunction"/>s), waiting for the failed
/// backward() call to be translated by <see cref="TorchErrors.Translate"/>.
/// </summary>
internal static class CheckpointFailures
{
    private static Exception? pending;

    public static void Record(Exception e) => Interlocked.Exchange(ref pending, e);

    public static Exception? Take() => Interlocked.Exchange(ref pending, null);
}
