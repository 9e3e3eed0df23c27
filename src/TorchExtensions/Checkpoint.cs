using System.Runtime.InteropServices;
using LoRAHub.TorchExtensions.Cuda;
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
        /// Offload (<paramref name="offload"/>, CUDA inputs only; a no-op on the CPU): the kept input is copied to pinned host
        /// memory on a side stream while f runs, and its device memory is freed once the copy has completed; in backward it
        /// is copied back before the recomputation, and the input of the checkpoint offloaded just before this one is
        /// prefetched while this one recomputes (backward visits them in reverse order). The values come back bit for bit,
        /// so gradients are those of the plain checkpoint. Pinned buffers are pooled (<see cref="empty_offload_cache"/>).
        /// </remarks>
        public static Tensor checkpoint(Func<Tensor, Tensor> f, Tensor x, bool offload = false)
        {
            ArgumentNullException.ThrowIfNull(f);
            if (!is_grad_enabled()) return f(x);
            return ApplyRecomputing(new CheckpointFunction(f, offload), x, "checkpointed function");
        }

        /// <summary>
        /// Applies a function that keeps only its input and recomputes in backward (checkpoint, sequence_chunked): the input
        /// is made to require grad (else autograd never calls backward and parameters inside get no gradient), and errors
        /// become <see cref="TorchException"/>s naming <paramref name="what"/>.
        /// </summary>
        internal static Tensor ApplyRecomputing(CustomFunction function, Tensor x, string what)
        {
            var input = x.requires_grad ? x : x.detach().requires_grad_(true);
            try
            {
                return function.apply(input)[0];
            }
            catch (ExternalException e)
            {
                throw TorchErrors.Translate(e);
            }
            catch (Exception e) when (e is not TorchException)
            {
                throw new TorchException(TorchErrorKind.Generic, $"{what} failed: {e.Message}", e);
            }
            finally
            {
                if (!ReferenceEquals(input, x)) input.Dispose();
            }
        }

        /// <summary>Where checkpointed inputs are now (see <see cref="CheckpointOffloadStats"/>).</summary>
        public static CheckpointOffloadStats checkpoint_offload_stats() => new(
            CheckpointFunction.SavedDeviceBytes + OffloadedTensor.PendingSourceBytes, PinnedHostPool.InUseBytes,
            PinnedHostPool.ReservedBytes, OffloadedTensor.Copies);

        /// <summary>
        /// Frees the pooled pinned host buffers that no offloaded checkpoint is using, and the device inputs of finished
        /// copies still kept (after waiting for the copies queued on them). A no-op without CUDA.
        /// </summary>
        public static void empty_offload_cache()
        {
            if (CudaStreams.UnavailableReason is not null) return;
            OffloadedTensor.ReapSources(0);
            PinnedHostPool.Trim();
        }
    }
}

/// <summary>Memory held for checkpointed layers' inputs.</summary>
/// <param name="DeviceBytes">Checkpoint inputs kept on a CUDA device: the saved inputs of checkpoints without offload,
/// plus offloaded ones whose copy to the host has not been seen to complete yet (at most two).</param>
/// <param name="HostBytes">Offloaded inputs waiting in pinned host memory for backward.</param>
/// <param name="PinnedReservedBytes">Pinned host memory the pool holds, used or free.</param>
/// <param name="Copies">Offload copies (out and back) so far in this process.</param>
public sealed record CheckpointOffloadStats(long DeviceBytes, long HostBytes, long PinnedReservedBytes, long Copies);

/// <summary>The custom autograd function behind <see cref="torchx.utils.checkpoint"/>: one instance per call.</summary>
internal sealed class CheckpointFunction(Func<Tensor, Tensor> f, bool offload = false) : CustomFunction
{
    private static long savedDeviceBytes;
    private static bool warnedNoStreams, warnedStoreFailed;
    // The checkpoint offloaded most recently in forward; each checkpoint notes the one before it, which backward (running
    // in reverse) reaches next, so its copy back can start early.
    private static CheckpointFunction? lastOffloaded;
    private static readonly object chainGate = new();

    private Tensor? input;
    private long inputDeviceBytes;
    private OffloadedTensor? offloaded;
    private CheckpointFunction? previousOffloaded;
    private RngReplay? rng;
    private bool cuda;

    protected override string name => "checkpoint";

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        var x = inputs[0]!;
        cuda = x.device_type == DeviceType.CUDA;
        rng = RngReplay.Start(x);
        // Queued before f, so the copy overlaps f's kernels; x's memory is freed once it has completed.
        if (offload && cuda && x.numel() > 0 && StreamsUsable()) offloaded = TryStore(x);
        if (cuda)
        {
            lock (chainGate)
            {
                previousOffloaded = lastOffloaded;
                if (offloaded is not null) lastOffloaded = this;
            }
        }
        if (offloaded is null)
        {
            input = save(x);
            if (cuda)
            {
                inputDeviceBytes = x.numel() * x.element_size();
                Interlocked.Add(ref savedDeviceBytes, inputDeviceBytes);
            }
        }
        var y = f(x);
        return [ReferenceEquals(y, x) ? x.alias() : y]; // never hand the caller's own tensor to the graph as an output
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        // Runs on libtorch's autograd thread (the device thread on CUDA), inside CustomFunction's dispose scope.
        Tensor? x = null;
        var replay = rng!.Replay();
        Tensor? back = null;
        try
        {
            back = offloaded?.Take();
            // Start the copy back of the next offloaded input backward needs (offloaded before this one in forward)
            // while this one recomputes.
            CheckpointFunction? next;
            lock (chainGate) next = previousOffloaded;
            next?.PrefetchInput();
            x = (back ?? input!).detach().requires_grad_(true);
            using var grad = enable_grad();
            var output = f(x);
            if (!output.requires_grad)
                throw new InvalidOperationException("the checkpointed function's output does not depend on anything that requires grad");
            output.backward([grad_outputs[0]]);
        }
        finally
        {
            replay.Dispose();
            back?.Dispose();
        }
        return [x!.grad?.detach()];
    }

    /// <summary>Bytes of checkpoint inputs saved on a CUDA device (without offload) and not yet freed.</summary>
    internal static long SavedDeviceBytes => Interlocked.Read(ref savedDeviceBytes);

    private void PrefetchInput()
    {
        try
        {
            offloaded?.Prefetch();
        }
        catch (TorchException)
        {
            // Only an early start failed (e.g. no device memory for it yet): that checkpoint's own backward copies it
            // back itself, and reports a failure then.
        }
    }

    protected override void release()
    {
        Interlocked.Add(ref savedDeviceBytes, -inputDeviceBytes);
        inputDeviceBytes = 0;
        offloaded?.Dispose();
        lock (chainGate)
        {
            previousOffloaded = null; // no chain of dead functions across steps
            if (ReferenceEquals(lastOffloaded, this)) lastOffloaded = null;
        }
    }

    // Pinned host memory can run out (it is locked RAM): then this input stays on the device, and the run goes on.
    private static OffloadedTensor? TryStore(Tensor x)
    {
        try
        {
            return OffloadedTensor.Store(x);
        }
        catch (TorchException e)
        {
            if (!warnedStoreFailed)
            {
                warnedStoreFailed = true;
                Console.Error.WriteLine($"LoRAHub: checkpoint offload failed, keeping inputs on the GPU where it does: {e.Message.Split('\n')[0]}");
            }
            return null;
        }
    }

    // Offload needs the CUDA driver's stream API; without it the input stays on the device (said once).
    private static bool StreamsUsable()
    {
        if (CudaStreams.UnavailableReason is not { } why) return true;
        if (!warnedNoStreams)
        {
            warnedNoStreams = true;
            Console.Error.WriteLine($"LoRAHub: checkpoint offload is off, inputs stay on the GPU: {why}");
        }
        return false;
    }
}

/// <summary>
/// The random numbers of a function that backward runs again (<see cref="torchx.utils.checkpoint"/>,
/// <see cref="torchx.utils.sequence_chunked"/>). <see cref="Start"/>, before the function's first run: for a CUDA input two
/// seeds drawn from the CPU generator, then the CPU generator's state recorded (as bytes: no tensor lifetime across
/// forward and backward), and the CUDA generator seeded with the first seed. <see cref="Replay"/>, around the
/// recomputation: both generators as they were at the start; disposed, the CPU generator's state of the moment back and the
/// CUDA generator seeded with the second seed, so later random numbers do not repeat those of the function.
/// </summary>
internal sealed class RngReplay : IDisposable
{
    private readonly byte[] cpuState;
    private readonly bool cuda;
    private readonly long seed, after;
    private byte[]? current;

    private RngReplay(bool cuda)
    {
        this.cuda = cuda;
        if (cuda)
        {
            using var seeds = randint(0, long.MaxValue, [2], ScalarType.Int64);
            var values = seeds.data<long>().ToArray();
            (seed, after) = (values[0], values[1]);
        }
        cpuState = GetCpuState();
        if (cuda) torch.cuda.manual_seed(seed);
    }

    /// <summary>Records the generators for a function about to run on <paramref name="x"/> (see the class).</summary>
    public static RngReplay Start(Tensor x) => new(x.device_type == DeviceType.CUDA);

    /// <summary>Seeds the CUDA generator with the second seed (no-op for a CPU input): random numbers after the function's run differ from its own.</summary>
    public void SeedAfter()
    {
        if (cuda) torch.cuda.manual_seed(after);
    }

    /// <summary>Puts both generators back as they were at <see cref="Start"/> until the returned scope is disposed.</summary>
    public IDisposable Replay()
    {
        current = GetCpuState();
        SetCpuState(cpuState);
        if (cuda) torch.cuda.manual_seed(seed);
        return this;
    }

    public void Dispose()
    {
        if (current is null) return;
        SetCpuState(current);
        current = null;
        SeedAfter();
    }

    private static byte[] GetCpuState()
    {
        using var state = torch.random.get_rng_state();
        return state.data<byte>().ToArray();
    }

    private static void SetCpuState(byte[] bytes)
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
