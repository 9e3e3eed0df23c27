using System.Runtime.InteropServices;

namespace LoRAHub.Distributed.Nccl;

/// <summary>
/// The CUDA runtime calls the NCCL backend needs (current device, events to see when enqueued collectives finish),
/// bound to the libcudart the loaded libtorch uses, so no second CUDA runtime enters the process.
/// </summary>
internal static unsafe class CudaEvents
{
    public const int Success = 0;
    public const int NotReady = 600;
    private const uint DisableTiming = 2;

    /// <summary>The legacy default stream: where libtorch (stream 0, not per-thread) and our kernels compute.</summary>
    public static readonly IntPtr DefaultStream = IntPtr.Zero;

    private static readonly Lazy<Api> api = new(Bind);

    private sealed class Api
    {
        public delegate* unmanaged<int, int> SetDevice;
        public delegate* unmanaged<IntPtr*, uint, int> EventCreateWithFlags;
        public delegate* unmanaged<IntPtr, IntPtr, int> EventRecord;
        public delegate* unmanaged<IntPtr, int> EventQuery;
        public delegate* unmanaged<IntPtr, int> EventDestroy;
        public delegate* unmanaged<int, IntPtr> GetErrorString;
        public delegate* unmanaged<IntPtr*, uint, int> StreamCreateWithFlags;
        public delegate* unmanaged<IntPtr, IntPtr, uint, int> StreamWaitEvent;
        public delegate* unmanaged<IntPtr, int> StreamDestroy;
    }

    private static Api Bind()
    {
        // The libcudart libtorch loaded (its exact file), so that this is the same runtime and the same device state.
        var path = NcclLocator.LoadedPaths("libcudart").FirstOrDefault() ?? "libcudart.so";
        if (!NativeLibrary.TryLoad(path, out var rt))
            throw new DistributedException($"the CUDA runtime ({path}) could not be loaded; the nccl backend needs a CUDA build of libtorch");
        IntPtr Sym(string name) => NativeLibrary.GetExport(rt, name);
        return new Api
        {
            SetDevice = (delegate* unmanaged<int, int>)Sym("cudaSetDevice"),
            EventCreateWithFlags = (delegate* unmanaged<IntPtr*, uint, int>)Sym("cudaEventCreateWithFlags"),
            EventRecord = (delegate* unmanaged<IntPtr, IntPtr, int>)Sym("cudaEventRecord"),
            EventQuery = (delegate* unmanaged<IntPtr, int>)Sym("cudaEventQuery"),
            EventDestroy = (delegate* unmanaged<IntPtr, int>)Sym("cudaEventDestroy"),
            GetErrorString = (delegate* unmanaged<int, IntPtr>)Sym("cudaGetErrorString"),
            StreamCreateWithFlags = (delegate* unmanaged<IntPtr*, uint, int>)Sym("cudaStreamCreateWithFlags"),
            StreamWaitEvent = (delegate* unmanaged<IntPtr, IntPtr, uint, int>)Sym("cudaStreamWaitEvent"),
            StreamDestroy = (delegate* unmanaged<IntPtr, int>)Sym("cudaStreamDestroy"),
        };
    }

    private static void Check(int status, string call)
    {
        if (status != Success)
            throw new DistributedException($"{call} failed: {Marshal.PtrToStringAnsi(api.Value.GetErrorString(status))} ({status})");
    }

    public static void SetDevice(int device) => Check(api.Value.SetDevice(device), "cudaSetDevice");

    /// <summary>An event recorded on <paramref name="stream"/> (default: the device's default stream) after the work enqueued so far.</summary>
    public static IntPtr Record(int device, IntPtr stream = default)
    {
        // The legacy stream is per device: make sure it is this rank's (libtorch's guards restore the current device).
        SetDevice(device);
        IntPtr e;
        Check(api.Value.EventCreateWithFlags(&e, DisableTiming), "cudaEventCreateWithFlags");
        Check(api.Value.EventRecord(e, stream), "cudaEventRecord");
        return e;
    }

    /// <summary>
    /// A stream of the device that does not synchronise with the legacy default stream (cudaStreamNonBlocking), so work
    /// on it runs concurrently with the compute on the default stream; ordering is by events only.
    /// </summary>
    public static IntPtr CreateStream(int device)
    {
        SetDevice(device);
        IntPtr s;
        Check(api.Value.StreamCreateWithFlags(&s, 1 /* cudaStreamNonBlocking */), "cudaStreamCreateWithFlags");
        return s;
    }

    /// <summary>Work enqueued on <paramref name="waiting"/> from now on starts after the work enqueued so far on <paramref name="after"/>.</summary>
    public static void Order(int device, IntPtr waiting, IntPtr after)
    {
        var e = Record(device, after);
        try { Check(api.Value.StreamWaitEvent(waiting, e, 0), "cudaStreamWaitEvent"); }
        finally { Destroy(e); } // the wait keeps what it needs: destroying a recorded event is allowed
    }

    /// <summary>Work enqueued on <paramref name="stream"/> from now on starts after <paramref name="e"/> completes.</summary>
    public static void Wait(IntPtr stream, IntPtr e) => Check(api.Value.StreamWaitEvent(stream, e, 0), "cudaStreamWaitEvent");

    public static void DestroyStream(IntPtr s) => api.Value.StreamDestroy(s);

    /// <summary>True when the work before the event has finished; false while it runs.</summary>
    public static bool Done(IntPtr e)
    {
        var s = api.Value.EventQuery(e);
        if (s == NotReady) return false;
        Check(s, "cudaEventQuery");
        return true;
    }

    public static void Destroy(IntPtr e) => api.Value.EventDestroy(e);
}
