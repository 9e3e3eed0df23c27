using System.Diagnostics;
using LoRAHub.TorchExtensions;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Distributed.Nccl;

/// <summary>
/// The GPU backend: NCCL collectives on CUDA tensors in place, enqueued on the default stream libtorch computes on (so
/// they run after the kernels that made the gradients, and later kernels run after them, with no host sync). Rank 0 makes
/// the communicator's unique id and hands it out through the <see cref="TcpStore"/>.
/// A watchdog thread polls <c>ncclCommGetAsyncError</c> and the completion events of the enqueued collectives: on an
/// error, or a collective unfinished after the timeout, it calls <c>ncclCommAbort</c> (stuck kernels exit) and the next
/// call on the group raises a <see cref="DistributedException"/> naming the rank that failed or went silent (from the
/// heartbeats every rank publishes in the store).
/// </summary>
public sealed class NcclProcessGroup : ProcessGroup
{
    private static readonly TimeSpan HeartbeatEvery = TimeSpan.FromSeconds(1);
    private readonly IntPtr comm;
    private readonly TcpStore store;
    private readonly Queue<(IntPtr evt, string what, long ticks, long seq)> pending = new();
    private readonly object gate = new();
    private readonly Thread watchdog;
    private readonly CancellationTokenSource stop = new();
    private volatile DistributedException? failure;
    private long issued, completed;
    private int aborted;
    private IntPtr commStream;

    private NcclProcessGroup(DistributedEnvironment environment, TimeSpan timeout, IntPtr comm, TcpStore store, int device) : base(environment, timeout)
    {
        this.comm = comm;
        this.store = store;
        Device = device;
        watchdog = new Thread(Watch) { IsBackground = true, Name = "lorahub-nccl-watchdog" };
        watchdog.Start();
    }

    public override string Backend => "nccl";
    protected override DeviceType TensorDevice => DeviceType.CUDA;

    /// <summary>The CUDA device of this rank.</summary>
    public int Device { get; }

    /// <summary>Joins the ranks: rendezvous at MASTER_ADDR:MASTER_PORT, then ncclCommInitRank on <paramref name="device"/>.</summary>
    public static NcclProcessGroup Create(DistributedEnvironment environment, int device, TimeSpan timeout)
    {
        NativeLibraries.Register();
        NcclLocator.Load();
        CudaEvents.SetDevice(device);
        var store = new TcpStore(environment.MasterAddr, environment.MasterPort, environment.Rank == 0, timeout);
        try
        {
            NcclNative.UniqueId id;
            if (environment.Rank == 0)
            {
                Check(NcclNative.GetUniqueId(out id), "ncclGetUniqueId", 0);
                store.Set("nccl/unique_id", ToBytes(id));
            }
            else
            {
                id = FromBytes(store.Get("nccl/unique_id"));
            }
            // ncclCommInitRank blocks until every rank joins; a rank that never comes is caught by the store's GET timeout
            // above for most failures, and by the launcher for a rank that dies.
            Check(NcclNative.CommInitRank(out var comm, environment.WorldSize, id, environment.Rank), "ncclCommInitRank", environment.Rank);
            return new NcclProcessGroup(environment, timeout, comm, store, device);
        }
        catch
        {
            store.Dispose();
            throw;
        }
    }

    private static unsafe byte[] ToBytes(NcclNative.UniqueId id) => new ReadOnlySpan<byte>(id.Internal, NcclNative.UniqueIdBytes).ToArray();

    private static unsafe NcclNative.UniqueId FromBytes(byte[] bytes)
    {
        if (bytes.Length != NcclNative.UniqueIdBytes) throw new DistributedException($"the NCCL unique id from rank 0 has {bytes.Length} bytes, not 128");
        var id = new NcclNative.UniqueId();
        bytes.CopyTo(new Span<byte>(id.Internal, NcclNative.UniqueIdBytes));
        return id;
    }

    public override void ThrowIfFailed()
    {
        if (failure != null) throw failure;
    }

    protected override void AllReduce(Tensor tensor, ReduceOp op) => Enqueue("all_reduce", () =>
        NcclNative.AllReduce(torchx.data_ptr(tensor), torchx.data_ptr(tensor), (nuint)tensor.numel(), NcclNative.DataType(tensor.dtype),
            NcclNative.Op(op), comm, CudaEvents.DefaultStream));

    /// <summary>
    /// On the group's communication stream (non-blocking, made on first use): it waits for the default stream's work so
    /// far (an event), so the collective overlaps the compute enqueued after it; <see cref="Work.wait"/> makes the default
    /// stream wait for its completion event. NCCL runs a communicator's collectives in the order they are enqueued on
    /// the device: plain collectives come after a wait on every started one (the trainer waits before its next).
    /// </summary>
    protected override Work AllReduceAsync(Tensor tensor, ReduceOp op)
    {
        if (commStream == IntPtr.Zero) commStream = CudaEvents.CreateStream(Device);
        var stream = commStream;
        CudaEvents.Order(Device, stream, CudaEvents.DefaultStream);
        Enqueue("all_reduce (overlapped)", () =>
            NcclNative.AllReduce(torchx.data_ptr(tensor), torchx.data_ptr(tensor), (nuint)tensor.numel(), NcclNative.DataType(tensor.dtype),
                NcclNative.Op(op), comm, stream), stream);
        return new StreamWork(Device, CudaEvents.Record(Device, stream));
    }

    private sealed class StreamWork(int device, IntPtr done) : Work
    {
        private IntPtr done = done;

        public override void wait()
        {
            if (done == IntPtr.Zero) return;
            var e = done;
            done = IntPtr.Zero;
            try
            {
                CudaEvents.SetDevice(device);
                CudaEvents.Wait(CudaEvents.DefaultStream, e);
            }
            finally
            {
                CudaEvents.Destroy(e);
            }
        }
    }

    protected override void Broadcast(Tensor tensor, int src) => Enqueue($"broadcast from rank {src}", () =>
        NcclNative.Broadcast(torchx.data_ptr(tensor), torchx.data_ptr(tensor), (nuint)tensor.numel(), NcclNative.DataType(tensor.dtype),
            src, comm, CudaEvents.DefaultStream));

    protected override void AllGather(Tensor output, Tensor input) => Enqueue("all_gather", () =>
        NcclNative.AllGather(torchx.data_ptr(input), torchx.data_ptr(output), (nuint)input.numel(), NcclNative.DataType(input.dtype),
            comm, CudaEvents.DefaultStream));

    protected override void ReduceScatter(Tensor output, Tensor input, ReduceOp op) => Enqueue("reduce_scatter", () =>
        NcclNative.ReduceScatter(torchx.data_ptr(input), torchx.data_ptr(output), (nuint)output.numel(), NcclNative.DataType(input.dtype),
            NcclNative.Op(op), comm, CudaEvents.DefaultStream));

    /// <summary>An all-reduce of one element, then a wait for it on the host (the watchdog bounds the wait).</summary>
    protected override void Barrier()
    {
        using var one = torch.ones(1, ScalarType.Float32, new torch.Device(DeviceType.CUDA, Device));
        AllReduce(one, ReduceOp.SUM);
        // Copying the result to the host waits for the collective (and all work before it) on the stream; an aborted
        // collective returns, and the failure is raised below.
        using var host = one.cpu();
        ThrowIfFailed();
    }

    private void Enqueue(string what, Func<int> call, IntPtr stream = default)
    {
        ThrowIfFailed();
        var r = call();
        if (r != NcclNative.Success && r != NcclNative.InProgress)
        {
            Fail(new DistributedException($"rank {Rank}: NCCL {what} failed: {NcclNative.Describe(r)}", Rank));
            ThrowIfFailed();
        }
        var evt = CudaEvents.Record(Device, stream);
        lock (gate) pending.Enqueue((evt, what, Stopwatch.GetTimestamp(), ++issued));
    }

    private void Watch()
    {
        // This thread's CUDA calls (event queries) must not create a context on device 0 of another rank's GPU.
        try { CudaEvents.SetDevice(Device); }
        catch (DistributedException e) { Fail(e); return; }
        var lastBeat = Stopwatch.StartNew();
        var beatFailed = false;
        while (!stop.Token.WaitHandle.WaitOne(TimeSpan.FromMilliseconds(50)))
        {
            if (failure != null) return;
            try
            {
                if (NcclNative.CommGetAsyncError(comm, out var async) == NcclNative.Success && async != NcclNative.Success && async != NcclNative.InProgress)
                {
                    Fail(new DistributedException($"rank {Rank}: NCCL reported {NcclNative.Describe(async)}. {SilentRanks()}", SilentRank));
                    return;
                }
                (IntPtr evt, string what, long ticks, long seq) oldest;
                lock (gate)
                {
                    while (pending.Count > 0 && CudaEvents.Done(pending.Peek().evt))
                    {
                        var done = pending.Dequeue();
                        CudaEvents.Destroy(done.evt);
                        completed = done.seq;
                    }
                    oldest = pending.Count > 0 ? pending.Peek() : default;
                }
                if (oldest.evt != IntPtr.Zero && Stopwatch.GetElapsedTime(oldest.ticks) > Timeout)
                {
                    Fail(new DistributedException(
                        $"rank {Rank}: NCCL {oldest.what} (collective #{oldest.seq}) did not finish within {Timeout.TotalSeconds:0.#} s. {SilentRanks()}", SilentRank));
                    return;
                }
                if (!beatFailed && lastBeat.Elapsed >= HeartbeatEvery)
                {
                    lastBeat.Restart();
                    try { store.Set($"heartbeat/{Rank}", BitConverter.GetBytes(Interlocked.Read(ref completed))); }
                    catch (DistributedException) { beatFailed = true; } // rank 0's store is gone: named when a collective stalls
                }
            }
            catch (Exception e)
            {
                Fail(new DistributedException($"rank {Rank}: the NCCL watchdog failed: {e.Message}", Rank, e));
                return;
            }
        }
    }

    private int? SilentRank { get; set; }

    /// <summary>Which ranks stopped publishing heartbeats (or whose store is gone): the likely culprits of a stall.</summary>
    private string SilentRanks()
    {
        var silent = new List<string>();
        try
        {
            for (var r = 0; r < WorldSize; r++)
            {
                if (r == Rank) continue;
                var age = store.Age($"heartbeat/{r}");
                if (age is null || age > 2 * HeartbeatEvery)
                {
                    SilentRank ??= r;
                    silent.Add(age is null ? $"rank {r} (never sent a heartbeat)" : $"rank {r} (silent for {age.Value.TotalSeconds:0.#} s)");
                }
            }
        }
        catch (DistributedException)
        {
            SilentRank = 0;
            return "Rank 0 (which serves the rendezvous store) is unreachable: it has likely died.";
        }
        return silent.Count > 0 ? $"Silent: {string.Join(", ", silent)}." : "Every rank still sends heartbeats: a rank may be stuck outside NCCL, or the ranks called different collectives.";
    }

    private void Fail(DistributedException e)
    {
        if (failure == null)
        {
            failure = e;
            Launch.LaunchedRank.RecordFailure(e.Message);
        }
        Abort();
    }

    // ncclCommAbort makes stuck NCCL kernels return, so a host blocked on the stream wakes up and sees the failure.
    private void Abort()
    {
        if (Interlocked.Exchange(ref aborted, 1) == 0) NcclNative.CommAbort(comm);
    }

    private static void Check(int r, string call, int rank)
    {
        if (r != NcclNative.Success) throw new DistributedException($"rank {rank}: {call} failed: {NcclNative.Describe(r)}", rank);
    }

    public override void Dispose()
    {
        stop.Cancel();
        watchdog.Join(TimeSpan.FromSeconds(5));
        if (failure == null && Interlocked.Exchange(ref aborted, 1) == 0)
        {
            lock (gate)
                while (pending.Count > 0) CudaEvents.Destroy(pending.Dequeue().evt);
            NcclNative.CommDestroy(comm);
        }
        if (commStream != IntPtr.Zero) CudaEvents.DestroyStream(commStream);
        store.Dispose();
    }
}
