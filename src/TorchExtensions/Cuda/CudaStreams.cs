using System.Runtime.InteropServices;

namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>
/// Side streams, events and page-locked host memory through the CUDA driver (libcuda), for copies that overlap libtorch's
/// compute. TorchSharp 0.107 has no stream API and libtorch computes on the legacy default stream, so ordering between the
/// two is explicit: an event recorded on one stream and waited for on the other (<see cref="After"/>). Our streams are
/// created non-blocking, so the legacy stream never synchronizes with them implicitly. There is no record_stream either:
/// memory a side stream reads or writes must be kept alive by the caller until that stream's event completes.
/// </summary>
internal static unsafe class CudaStreams
{
    private const uint StreamNonBlocking = 1;       // CU_STREAM_NON_BLOCKING
    private const uint EventDisableTiming = 2;      // CU_EVENT_DISABLE_TIMING: cheaper record and wait
    private const uint MemHostAllocPortable = 1;    // CU_MEMHOSTALLOC_PORTABLE: pinned for every context
    private const int ErrorNotReady = 600;          // CUDA_ERROR_NOT_READY from cuEventQuery

    private static readonly Lazy<string?> loadError = new(() =>
    {
        try
        {
            Bind();
            return null;
        }
        catch (Exception e)
        {
            return e.Message;
        }
    });
    private static readonly Dictionary<int, IntPtr> sideStreams = new();
    private static readonly Dictionary<int, IntPtr> computeStreams = new();

    private static delegate* unmanaged<IntPtr*, uint, int> cuStreamCreate;
    private static delegate* unmanaged<IntPtr, IntPtr, uint, int> cuStreamWaitEvent;
    private static delegate* unmanaged<IntPtr*, uint, int> cuEventCreate;
    private static delegate* unmanaged<IntPtr, IntPtr, int> cuEventRecord;
    private static delegate* unmanaged<IntPtr, int> cuEventQuery;
    private static delegate* unmanaged<IntPtr, int> cuEventSynchronize;
    private static delegate* unmanaged<IntPtr, int> cuEventDestroy;
    private static delegate* unmanaged<void**, nuint, uint, int> cuMemHostAlloc;
    private static delegate* unmanaged<void*, int> cuMemFreeHost;
    private static delegate* unmanaged<ulong, ulong, nuint, IntPtr, int> cuMemcpyAsync;

    /// <summary>Null when streams can be used here, else why not (no CUDA driver).</summary>
    public static string? UnavailableReason => CudaDriver.EnsureLoaded() ?? loadError.Value;

    private static void Bind()
    {
        if (!NativeLibrary.TryLoad("libcuda.so.1", out var lib) && !NativeLibrary.TryLoad("libcuda.so", out lib) &&
            !NativeLibrary.TryLoad("nvcuda.dll", out lib))
            throw new InvalidOperationException("the CUDA driver library (libcuda.so.1) is not installed");
        IntPtr Sym(params string[] names)
        {
            foreach (var n in names)
                if (NativeLibrary.TryGetExport(lib, n, out var p)) return p;
            throw new InvalidOperationException($"the CUDA driver library has no {names[0]}; update the NVIDIA driver");
        }
        cuStreamCreate = (delegate* unmanaged<IntPtr*, uint, int>)Sym("cuStreamCreate");
        cuStreamWaitEvent = (delegate* unmanaged<IntPtr, IntPtr, uint, int>)Sym("cuStreamWaitEvent");
        cuEventCreate = (delegate* unmanaged<IntPtr*, uint, int>)Sym("cuEventCreate");
        cuEventRecord = (delegate* unmanaged<IntPtr, IntPtr, int>)Sym("cuEventRecord");
        cuEventQuery = (delegate* unmanaged<IntPtr, int>)Sym("cuEventQuery");
        cuEventSynchronize = (delegate* unmanaged<IntPtr, int>)Sym("cuEventSynchronize");
        cuEventDestroy = (delegate* unmanaged<IntPtr, int>)Sym("cuEventDestroy_v2", "cuEventDestroy");
        cuMemHostAlloc = (delegate* unmanaged<void**, nuint, uint, int>)Sym("cuMemHostAlloc");
        cuMemFreeHost = (delegate* unmanaged<void*, int>)Sym("cuMemFreeHost");
        // The legacy-default-stream flavour (not _ptds): stream handles are explicit in every call here anyway.
        cuMemcpyAsync = (delegate* unmanaged<ulong, ulong, nuint, IntPtr, int>)Sym("cuMemcpyAsync");
    }

    /// <summary>
    /// Throws the reason when streams cannot be used; binds the driver calls on first use, which every entry that creates
    /// a stream, event, pinned buffer or copy runs first (a call through an unbound pointer would crash the process).
    /// </summary>
    public static void EnsureAvailable()
    {
        if (UnavailableReason is { } r) throw new TorchException(TorchErrorKind.Generic, "CUDA streams are unavailable: " + r);
    }

    /// <summary>Our non-blocking copy stream of a device (one per device, kept for the process).</summary>
    public static IntPtr SideStream(int device) => Stream(sideStreams, device);

    /// <summary>
    /// Our non-blocking stream for kernels that overlap libtorch's compute (one per device, kept for the process; apart
    /// from <see cref="SideStream"/>, so such a kernel never waits behind an offload copy).
    /// </summary>
    public static IntPtr ComputeStream(int device) => Stream(computeStreams, device);

    private static IntPtr Stream(Dictionary<int, IntPtr> streams, int device)
    {
        EnsureAvailable();
        lock (streams)
        {
            if (streams.TryGetValue(device, out var s)) return s;
            using var _ = CudaDriver.OnDevice(device);
            CudaDriver.Check(cuStreamCreate(&s, StreamNonBlocking), "cuStreamCreate");
            return streams[device] = s;
        }
    }

    /// <summary>
    /// Makes <paramref name="waiter"/> run its later work only after everything enqueued on <paramref name="producer"/>
    /// so far (an event recorded there, waited for on the GPU; the host does not block).
    /// </summary>
    public static void After(int device, IntPtr waiter, IntPtr producer)
    {
        using var _ = CudaDriver.OnDevice(device);
        var e = RecordEvent(device, producer);
        try
        {
            CudaDriver.Check(cuStreamWaitEvent(waiter, e, 0), "cuStreamWaitEvent");
        }
        finally
        {
            cuEventDestroy(e); // released by the driver once it has fired
        }
    }

    /// <summary>A new event recorded on <paramref name="stream"/> now; destroy it with <see cref="DestroyEvent"/>.</summary>
    public static IntPtr RecordEvent(int device, IntPtr stream)
    {
        EnsureAvailable();
        using var _ = CudaDriver.OnDevice(device);
        IntPtr e;
        CudaDriver.Check(cuEventCreate(&e, EventDisableTiming), "cuEventCreate");
        var status = cuEventRecord(e, stream);
        if (status != CudaDriver.Success)
        {
            cuEventDestroy(e);
            CudaDriver.Check(status, "cuEventRecord");
        }
        return e;
    }

    /// <summary>Makes <paramref name="stream"/> wait (on the GPU) for an event recorded earlier.</summary>
    public static void Wait(int device, IntPtr stream, IntPtr recorded)
    {
        using var _ = CudaDriver.OnDevice(device);
        CudaDriver.Check(cuStreamWaitEvent(stream, recorded, 0), "cuStreamWaitEvent");
    }

    /// <summary>True once all work before the event's record has completed (never blocks).</summary>
    public static bool Completed(IntPtr recorded)
    {
        var status = cuEventQuery(recorded);
        if (status == ErrorNotReady) return false;
        CudaDriver.Check(status, "cuEventQuery");
        return true;
    }

    /// <summary>Blocks the host until the event has fired.</summary>
    public static void Synchronize(IntPtr recorded) => CudaDriver.Check(cuEventSynchronize(recorded), "cuEventSynchronize");

    public static void DestroyEvent(int device, IntPtr recorded)
    {
        if (recorded == IntPtr.Zero) return;
        using var _ = CudaDriver.OnDevice(device);
        cuEventDestroy(recorded);
    }

    /// <summary>
    /// Page-locked host memory usable by every context (cuMemHostAlloc, in the device's primary context); out of memory
    /// throws OutOfMemoryTorchException.
    /// </summary>
    public static IntPtr AllocHost(int device, long bytes)
    {
        EnsureAvailable();
        using var _ = CudaDriver.OnDevice(device);
        void* p;
        CudaDriver.Check(cuMemHostAlloc(&p, (nuint)Math.Max(1, bytes), MemHostAllocPortable), $"cuMemHostAlloc ({bytes >> 20} MiB pinned)");
        return (IntPtr)p;
    }

    public static void FreeHost(int device, IntPtr p)
    {
        if (p == IntPtr.Zero) return;
        using var _ = CudaDriver.OnDevice(device);
        cuMemFreeHost((void*)p);
    }

    /// <summary>
    /// Copies <paramref name="bytes"/> between device and pinned host memory (direction from unified addressing) on
    /// <paramref name="stream"/>, asynchronously.
    /// </summary>
    public static void CopyAsync(int device, IntPtr dst, IntPtr src, long bytes, IntPtr stream)
    {
        if (bytes == 0) return;
        EnsureAvailable();
        using var _ = CudaDriver.OnDevice(device);
        CudaDriver.Check(cuMemcpyAsync((ulong)(long)dst, (ulong)(long)src, (nuint)bytes, stream), $"cuMemcpyAsync ({bytes} bytes)");
    }
}
