using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>
/// A CUDA tensor parked in pinned host memory: copied out on the device's side stream when stored, copied back on it when
/// fetched, each copy overlapping libtorch's compute on the legacy default stream.
/// </summary>
/// <remarks>
/// Ordering (no record_stream in TorchSharp, so by hand): the copy out waits (on the GPU) for the legacy stream's work so
/// far, which produced the tensor; the device tensor is kept until the copy's event has completed, checked by polling at
/// the next store or fetch (at most <see cref="MaxInFlight"/> copies' sources are kept; beyond that the host waits for the
/// oldest). The copy back goes into a tensor allocated on the legacy stream, so the side stream first waits for the legacy
/// stream (the allocator may hand out memory that queued kernels still use), and the legacy stream waits for the copy's
/// event before the tensor is used or freed.
/// </remarks>
internal sealed class OffloadedTensor : IDisposable
{
    /// <summary>Copies out whose device source may be kept before the host waits for the oldest.</summary>
    public const int MaxInFlight = 2;

    private static readonly List<(Tensor Source, IntPtr Copied, int Device, long Bytes)> sources = new();
    private static long pendingSourceBytes;
    private static long copies;

    private readonly long[] shape;
    private readonly ScalarType dtype;
    private readonly int device;
    private readonly long bytes;
    private PinnedBuffer? host;
    private IntPtr stored;
    private Tensor? fetched;
    private IntPtr fetchedEvent;
    private bool disposed;

    private OffloadedTensor(Tensor x, int device)
    {
        shape = x.shape;
        dtype = x.dtype;
        this.device = device;
        bytes = x.numel() * x.element_size();
    }

    /// <summary>Device bytes still held as sources of copies out whose completion has not been seen yet.</summary>
    public static long PendingSourceBytes => Interlocked.Read(ref pendingSourceBytes);

    /// <summary>Copies out and back so far in this process.</summary>
    public static long Copies => Interlocked.Read(ref copies);

    public long Bytes => bytes;

    /// <summary>Starts copying a CUDA tensor's values to pinned host memory; the caller may drop the tensor at once.</summary>
    public static OffloadedTensor Store(Tensor x)
    {
        if (x.device_type != DeviceType.CUDA) throw new ArgumentException($"only CUDA tensors are offloaded; got one on {x.device}", nameof(x));
        var device = KernelTensors.DeviceIndex(x);
        var result = new OffloadedTensor(x, device);
        // A dense copy to read from; a view of non-contiguous memory would need a strided copy.
        var source = (x.is_contiguous() ? x.detach() : x.detach().contiguous()).DetachFromDisposeScope();
        try
        {
            var side = CudaStreams.SideStream(device);
            result.host = PinnedHostPool.Rent(device, result.bytes);
            CudaStreams.After(device, side, CudaDriver.LegacyStream);
            CudaStreams.CopyAsync(device, result.host.Pointer, torchx.data_ptr(source), result.bytes, side);
            result.stored = CudaStreams.RecordEvent(device, side);
        }
        catch
        {
            // Nothing was queued that reads source unless the copy itself was: wait for the side stream before freeing.
            SynchronizeSide(device);
            source.Dispose();
            result.Dispose();
            throw;
        }
        Interlocked.Increment(ref copies);
        lock (sources)
        {
            sources.Add((source, result.stored, device, result.bytes));
            Interlocked.Add(ref pendingSourceBytes, result.bytes);
        }
        ReapSources(MaxInFlight);
        return result;
    }

    /// <summary>Starts copying the values back to the device (idempotent); <see cref="Take"/> then hands the tensor over.</summary>
    public void Prefetch()
    {
        lock (this)
        {
            if (disposed || fetched is not null || host is null) return;
            var side = CudaStreams.SideStream(device);
            var t = empty(shape, dtype, new Device(DeviceType.CUDA, device)).DetachFromDisposeScope();
            try
            {
                CudaStreams.After(device, side, CudaDriver.LegacyStream);
                CudaStreams.CopyAsync(device, torchx.data_ptr(t), host.Pointer, bytes, side);
                fetchedEvent = CudaStreams.RecordEvent(device, side);
            }
            catch
            {
                SynchronizeSide(device);
                t.Dispose();
                throw;
            }
            Interlocked.Increment(ref copies);
            // The next copy into this buffer queues on the same side stream, after this one.
            PinnedHostPool.Return(host);
            host = null;
            fetched = t;
        }
        ReapSources(0);
    }

    /// <summary>The values back on the device, ordered before the legacy stream's later work; the caller owns the tensor.</summary>
    public Tensor Take()
    {
        Prefetch();
        lock (this)
        {
            if (fetched is null) throw new InvalidOperationException("the offloaded tensor was already taken or freed");
            CudaStreams.Wait(device, CudaDriver.LegacyStream, fetchedEvent);
            var t = fetched;
            fetched = null;
            return t;
        }
    }

    public void Dispose()
    {
        lock (this)
        {
            if (disposed) return;
            disposed = true;
            if (fetched is not null)
            {
                // Freed memory is reused on the legacy stream: order that after the copy still writing into it.
                CudaStreams.Wait(device, CudaDriver.LegacyStream, fetchedEvent);
                fetched.Dispose();
                fetched = null;
            }
            if (host is not null) PinnedHostPool.Return(host);
            host = null;
            CudaStreams.DestroyEvent(device, fetchedEvent);
            fetchedEvent = IntPtr.Zero;
            // `stored` is destroyed when its source is reaped (the event is still polled there).
        }
    }

    /// <summary>
    /// Frees the device sources whose copies out have completed; then, while more than <paramref name="keep"/> remain,
    /// waits for the oldest.
    /// </summary>
    public static void ReapSources(int keep)
    {
        lock (sources)
        {
            // One side stream per device: its copies complete in order, so the first incomplete one ends the sweep.
            while (sources.Count > 0 && Completed(sources[0])) FreeOldest();
            while (sources.Count > keep)
            {
                using (CudaDriver.OnDevice(sources[0].Device)) CudaStreams.Synchronize(sources[0].Copied);
                FreeOldest();
            }
        }
    }

    private static bool Completed((Tensor Source, IntPtr Copied, int Device, long Bytes) s)
    {
        using var _ = CudaDriver.OnDevice(s.Device);
        return CudaStreams.Completed(s.Copied);
    }

    private static void FreeOldest()
    {
        var s = sources[0];
        sources.RemoveAt(0);
        s.Source.Dispose();
        CudaStreams.DestroyEvent(s.Device, s.Copied);
        Interlocked.Add(ref pendingSourceBytes, -s.Bytes);
    }

    // After a failure: let queued copies finish before their memory is freed (best effort; the original error is what matters).
    private static unsafe void SynchronizeSide(int device)
    {
        try
        {
            using var _ = CudaDriver.OnDevice(device);
            CudaDriver.cuStreamSynchronize(CudaStreams.SideStream(device));
        }
        catch (TorchException)
        {
        }
    }
}
