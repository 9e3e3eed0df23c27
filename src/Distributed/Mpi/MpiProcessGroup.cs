using LoRAHub.TorchExtensions;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Distributed.Mpi;

/// <summary>
/// The CPU backend: MPICH's collectives on CPU tensors in place, ranks started by MPICH's mpiexec (under our
/// launcher). bf16/fp16 tensors travel as fp32 (MPI has no such types). MPI cannot cancel a blocked collective: one
/// that runs past the timeout prints which collective hung and aborts the whole MPI job (every rank ends, none hangs);
/// a rank that dies makes mpiexec end the others.
/// </summary>
public sealed class MpiProcessGroup : ProcessGroup
{
    private static int initialized;
    private readonly CollectiveWatchdog watchdog;
    private readonly bool threadMultiple;
    private DistributedException? failure;

    private MpiProcessGroup(DistributedEnvironment environment, TimeSpan timeout, bool threadMultiple) : base(environment, timeout)
    {
        this.threadMultiple = threadMultiple;
        watchdog = new CollectiveWatchdog(timeout, OnTimeout);
    }

    public override string Backend => "mpi";
    protected override DeviceType TensorDevice => DeviceType.CPU;

    /// <summary>
    /// Initialises MPI once per process (MPI cannot be started twice). The ranks come from MPI itself; the environment's
    /// RANK and WORLD_SIZE, when given, must agree with them.
    /// </summary>
    public static MpiProcessGroup Create(DistributedEnvironment environment, TimeSpan timeout)
    {
        NativeLibraries.Register();
        if (Interlocked.Exchange(ref initialized, 1) == 1)
            throw new DistributedException("MPI was already initialised in this process: create one MPI process group per process and reuse it");
        Check(MpiNative.InitThread(IntPtr.Zero, IntPtr.Zero, MpiNative.ThreadMultiple, out var provided), "MPI_Init_thread");
        Check(MpiNative.CommSetErrhandler(MpiNative.CommWorld, MpiNative.ErrorsReturn), "MPI_Comm_set_errhandler");
        Check(MpiNative.CommRank(MpiNative.CommWorld, out var rank), "MPI_Comm_rank");
        Check(MpiNative.CommSize(MpiNative.CommWorld, out var size), "MPI_Comm_size");
        if (size == 1 && environment.WorldSize > 1)
            throw new DistributedException(
                $"WORLD_SIZE is {environment.WorldSize} but this process was not started by MPICH's mpiexec, which the CPU (mpi) backend needs " +
                "to connect the ranks: start them with `dotnet loraHub run --device cpu --nproc-per-node N script.csx` (it runs mpiexec) or `mpiexec -n N ...`; " +
                "for GPUs use the nccl backend.", environment.Rank);
        if (size != environment.WorldSize || rank != environment.Rank)
            throw new DistributedException(
                $"MPI placed this process at rank {rank} of {size}, but the environment says RANK {environment.Rank} of WORLD_SIZE {environment.WorldSize}. " +
                "Start the ranks with `dotnet loraHub run --nproc-per-node N` (which runs mpiexec) or plain `mpiexec -n N`, not both.", environment.Rank);
        return new MpiProcessGroup(environment, timeout, provided >= MpiNative.ThreadMultiple);
    }

    private void OnTimeout(string what, TimeSpan waited)
    {
        failure = new DistributedException(
            $"rank {Rank}: {what} did not finish within {Timeout.TotalSeconds:0.#} s (waited {waited.TotalSeconds:0.#} s): " +
            "another rank is stuck or never reached it. Aborting the MPI job.", null);
        Console.Error.WriteLine($"error: {failure.Message}");
        Console.Error.Flush();
        Launch.LaunchedRank.RecordFailure(failure.Message, exitCode: 3);
        // MPI_Abort from this thread needs MPI_THREAD_MULTIPLE; otherwise end this process and let mpiexec end the rest.
        if (threadMultiple) MpiNative.Abort(MpiNative.CommWorld, 3);
        System.Environment.Exit(3);
    }

    public override void ThrowIfFailed()
    {
        if (failure != null) throw failure;
    }

    protected override void AllReduce(Tensor tensor, ReduceOp op) =>
        Run(tensor, "all_reduce", (p, n, type) => MpiNative.Allreduce(MpiNative.InPlace, p, n, type, MpiNative.Op(op), MpiNative.CommWorld));

    protected override void Broadcast(Tensor tensor, int src) =>
        Run(tensor, $"broadcast from rank {src}", (p, n, type) => MpiNative.Bcast(p, n, type, src, MpiNative.CommWorld));

    protected override void AllGather(Tensor output, Tensor input)
    {
        var count = Count(input.numel(), "all_gather");
        WithMpiType(output, input, (o, i, type) =>
        {
            using var _ = watchdog.Enter("all_gather");
            Check(MpiNative.Allgather(torchx.data_ptr(i), count, type, torchx.data_ptr(o), count, type, MpiNative.CommWorld), "MPI_Allgather", Rank);
        });
    }

    protected override void ReduceScatter(Tensor output, Tensor input, ReduceOp op)
    {
        var count = Count(output.numel(), "reduce_scatter");
        WithMpiType(output, input, (o, i, type) =>
        {
            using var _ = watchdog.Enter("reduce_scatter");
            Check(MpiNative.ReduceScatterBlock(torchx.data_ptr(i), torchx.data_ptr(o), count, type, MpiNative.Op(op), MpiNative.CommWorld),
                "MPI_Reduce_scatter_block", Rank);
        });
    }

    protected override void Barrier()
    {
        using var _ = watchdog.Enter("barrier");
        Check(MpiNative.Barrier(MpiNative.CommWorld), "MPI_Barrier", Rank);
    }

    // In-place collectives on one buffer, in chunks of at most 2^30 elements (MPI counts are ints).
    private void Run(Tensor tensor, string what, Func<IntPtr, int, int, int> call)
    {
        WithMpiType(tensor, null, (t, _, type) =>
        {
            using var scope = watchdog.Enter(what);
            var size = t.element_size();
            var total = t.numel();
            var start = torchx.data_ptr(t);
            for (long done = 0; done < total; done += 1L << 30)
            {
                var n = (int)Math.Min(1L << 30, total - done);
                Check(call(start + (nint)(done * size), n, type), $"MPI {what}", Rank);
            }
        });
    }

    // bf16/fp16 (and other types MPI lacks) go through fp32 copies.
    private static void WithMpiType(Tensor output, Tensor? input, Action<Tensor, Tensor, int> body)
    {
        if (MpiNative.DataType(output.dtype) is int type)
        {
            body(output, input ?? output, type);
            return;
        }
        if (!output.is_floating_point())
            throw new ArgumentException($"the mpi backend cannot reduce {output.dtype} tensors");
        using var o32 = output.to(ScalarType.Float32);
        using var i32 = input?.to(ScalarType.Float32);
        body(o32, i32 ?? o32, MpiNative.Float);
        using (no_grad()) output.copy_(o32);
    }

    private static int Count(long n, string what) => n <= int.MaxValue
        ? (int)n
        : throw new ArgumentException($"{what}: {n} elements per rank is more than MPI's int count allows; split the tensor");

    private static void Check(int code, string what, int? rank = null)
    {
        if (code != MpiNative.Success)
            throw new DistributedException($"{what} failed{(rank is int r ? $" on rank {r}" : "")}: {MpiNative.Describe(code)}", rank);
    }

    public override void Dispose()
    {
        watchdog.Dispose();
        if (failure == null) MpiNative.Finalize();
    }
}
