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
        /// Errors: an exception thrown by f during backward's recomputation cannot cross libtorch's autograd engine; it is
        /// kept and backward() is made to fail (a libtorch error), which <see cref="TorchErrors.Translate"/> (or
        /// <see cref="Guard(Action)"/> around backward()) turns into a <see cref="TorchException"/> whose inner exception is
        /// f's. Memory: TorchSharp's node would keep an empty_like copy of the output for the graph's life; it is released
        /// (<see cref="AutogradOutputCache"/>).
        /// </remarks>
        public static Tensor checkpoint(Func<Tensor, Tensor> f, Tensor x)
        {
            ArgumentNullException.ThrowIfNull(f);
            if (!is_grad_enabled()) return f(x);
            // The input must require grad, or autograd never calls backward and parameters inside f get no gradient.
            var input = x.requires_grad ? x : x.detach().requires_grad_(true);
            var state = new CheckpointFunction.State(f);
            try
            {
                return AutogradOutputCache.Flush(CheckpointFunction.apply(input, state));
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
                // apply returned a new wrapper of f's output (with the grad_fn); f's own wrapper is not needed.
                state.Output?.Dispose();
                state.Output = null;
                if (!ReferenceEquals(input, x)) input.Dispose();
            }
        }
    }
}

/// <summary>The custom autograd function behind <see cref="torchx.utils.checkpoint"/>.</summary>
internal sealed class CheckpointFunction : autograd.SingleTensorFunction<CheckpointFunction>
{
    public override string Name => "Checkpoint";

    internal sealed class State(Func<Tensor, Tensor> f)
    {
        public Func<Tensor, Tensor> Function { get; } = f;
        public byte[] CpuRngState { get; set; } = [];
        public long CudaSeed { get; set; }
        public long CudaSeedAfter { get; set; }
        public bool Cuda { get; set; }
        public Tensor? Output { get; set; }
    }

    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        var (x, state) = ((Tensor)vars[0], (State)vars[1]);
        state.Cuda = x.device_type == DeviceType.CUDA;
        if (state.Cuda)
        {
            using var seeds = randint(0, long.MaxValue, [2], ScalarType.Int64);
            var values = seeds.data<long>().ToArray();
            (state.CudaSeed, state.CudaSeedAfter) = (values[0], values[1]);
        }
        state.CpuRngState = RngState.Get();
        if (state.Cuda) torch.cuda.manual_seed(state.CudaSeed);
        Tensor y;
        using (var scope = NewDisposeScope())
        {
            y = state.Function(x);
            if (ReferenceEquals(y, x)) y = x.alias(); // f's output is disposed after apply: never the caller's tensor
            y.DetachFromDisposeScope();
        }
        state.Output = y;
        ctx.save_for_backward([x]);
        ctx.save_data("state", state);
        ctx.ReleaseAfterApply();
        return y;
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad_output)
    {
        // Runs on libtorch's autograd thread (the device thread on CUDA), outside any dispose scope of the caller:
        // everything is freed here explicitly, and no exception may escape into the native engine.
        var state = (State)ctx.get_data("state");
        try
        {
            if (grad_output is null || grad_output.IsInvalid) return [null!, null!];
            using var scope = NewDisposeScope();
            var x = ctx.get_saved_variables()[0];
            var current = RngState.Get();
            RngState.Set(state.CpuRngState);
            if (state.Cuda) torch.cuda.manual_seed(state.CudaSeed);
            var input = x.detach().requires_grad_(true);
            try
            {
                using var grad = enable_grad();
                var output = state.Function(input);
                if (!output.requires_grad)
                    throw new InvalidOperationException("the checkpointed function's output does not depend on anything that requires grad");
                output.backward([grad_output]);
            }
            finally
            {
                RngState.Set(current);
                if (state.Cuda) torch.cuda.manual_seed(state.CudaSeedAfter);
            }
            var gx = input.grad;
            return [gx is null ? null! : gx.detach().DetachFromDisposeScope(), null!];
        }
        catch (Exception e)
        {
            return Fail(e, ctx);
        }
    }

    // A gradient on the meta device makes libtorch's engine reject it ("invalid gradient ... expected device"), which
    // aborts this backward() with an error in the calling thread; the .NET exception is kept for TorchErrors.Translate.
    private static List<Tensor> Fail(Exception e, autograd.AutogradContext ctx)
    {
        CheckpointFailures.Record(e);
        try
        {
            var x = ctx.get_saved_variables()[0];
            var bad = empty(x.shape.Length == 0 ? [2] : x.shape, x.dtype, META).DetachFromDisposeScope();
            x.Dispose();
            return [bad, null!];
        }
        catch
        {
            return [empty([2, 3, 5], device: META).DetachFromDisposeScope(), null!];
        }
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

/// <summary>Exceptions thrown inside checkpointed functions during backward, waiting for the failed backward() to be translated.</summary>
internal static class CheckpointFailures
{
    private static Exception? pending;

    public static void Record(Exception e) => Interlocked.CompareExchange(ref pending, e, null);

    public static Exception? Take() => Interlocked.Exchange(ref pending, null);
}
