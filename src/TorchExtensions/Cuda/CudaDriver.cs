using System.Runtime.InteropServices;

namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>
/// The CUDA driver API calls our kernels need (libcuda.so.1, installed with the NVIDIA driver), bound at run time: module
/// loading and kernel launches, managed memory for paged optimizer state, and a few queries. C functions on raw pointers
/// only, so nothing here depends on which libtorch (or CUDA runtime) TorchSharp loaded. Everything runs in the device's
/// primary context, the one the CUDA runtime (and so libtorch) uses.
/// </summary>
internal static unsafe class CudaDriver
{
    /// <summary>CU_STREAM_LEGACY: the legacy default stream, where libtorch computes unless told otherwise.</summary>
    public static readonly IntPtr LegacyStream = 1;

    // CUdevice_attribute values.
    public const int AttrMultiprocessorCount = 16;
    public const int AttrL2CacheSize = 38;
    public const int AttrManagedMemory = 83;
    public const int AttrComputeCapabilityMajor = 75;
    public const int AttrComputeCapabilityMinor = 76;
    public const int AttrConcurrentManagedAccess = 89;
    public const int AttrMaxSharedMemoryPerBlockOptin = 97;

    // CU_POINTER_ATTRIBUTE_IS_MANAGED, CU_MEM_ATTACH_GLOBAL, CU_DEVICE_CPU, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
    // CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, CU_FUNC_ATTRIBUTE_NUM_REGS.
    public const int PointerAttrIsManaged = 8;
    public const uint MemAttachGlobal = 1;
    public const int DeviceCpu = -1;
    public const int FuncAttrMaxDynamicSharedSizeBytes = 8;
    public const int FuncAttrLocalSizeBytes = 3;
    public const int FuncAttrNumRegs = 4;

    public const int Success = 0;
    public const int ErrorOutOfMemory = 2;

    /// <summary>CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (<see cref="DependentLaunch"/>).</summary>
    public const int LaunchAttributeProgrammaticStreamSerialization = 6;

    /// <summary>CUlaunchConfig (cuLaunchKernelEx): 56 bytes on 64-bit platforms, the stream at offset 32.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct LaunchConfig
    {
        public uint GridX, GridY, GridZ, BlockX, BlockY, BlockZ, SharedBytes;
        public IntPtr Stream;
        public LaunchAttribute* Attributes;
        public uint AttributeCount;
    }

    /// <summary>CUlaunchAttribute: the id, padding to 8 bytes, then a 64-byte value union whose first int is used here.</summary>
    [StructLayout(LayoutKind.Explicit, Size = 72)]
    public struct LaunchAttribute
    {
        [FieldOffset(0)] public int Id;
        [FieldOffset(8)] public int Value;
    }

    /// <summary>CUmemLocation (by value in cuMemPrefetchAsync_v2).</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct MemLocation
    {
        public int Type; // 1 = device, 2 = host
        public int Id;
    }

    // Bound once per process; the value is why binding failed (null when it worked).
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
    private static readonly Dictionary<int, IntPtr> primaryContexts = new();

    public static delegate* unmanaged<uint, int> cuInit;
    public static delegate* unmanaged<int*, int> cuDriverGetVersion;
    public static delegate* unmanaged<int*, int> cuDeviceGetCount;
    public static delegate* unmanaged<int*, int, int> cuDeviceGet;
    public static delegate* unmanaged<int*, int, int, int> cuDeviceGetAttribute;
    public static delegate* unmanaged<IntPtr*, int, int> cuDevicePrimaryCtxRetain;
    public static delegate* unmanaged<IntPtr*, int> cuCtxGetCurrent;
    public static delegate* unmanaged<IntPtr, int> cuCtxSetCurrent;
    public static delegate* unmanaged<IntPtr*, void*, int> cuModuleLoadData;
    public static delegate* unmanaged<IntPtr*, IntPtr, byte*, int> cuModuleGetFunction;
    public static delegate* unmanaged<IntPtr, int, int, int> cuFuncSetAttribute;
    public static delegate* unmanaged<int*, int, IntPtr, int> cuFuncGetAttribute;
    public static delegate* unmanaged<IntPtr, uint, uint, uint, uint, uint, uint, uint, IntPtr, void**, void**, int> cuLaunchKernel;
    public static delegate* unmanaged<LaunchConfig*, IntPtr, void**, void**, int> cuLaunchKernelEx; // CUDA 12+ drivers (null: absent)
    public static delegate* unmanaged<int, byte**, int> cuGetErrorString;
    public static delegate* unmanaged<int, byte**, int> cuGetErrorName;
    public static delegate* unmanaged<ulong*, nuint, uint, int> cuMemAllocManaged;
    public static delegate* unmanaged<ulong, int> cuMemFree;
    public static delegate* unmanaged<nuint*, nuint*, int> cuMemGetInfo;
    public static delegate* unmanaged<ulong, byte, nuint, IntPtr, int> cuMemsetD8Async;
    public static delegate* unmanaged<ulong, ulong, nuint, IntPtr, int> cuMemcpyAsync;
    public static delegate* unmanaged<ulong, nuint, int, IntPtr, int> cuMemPrefetchAsync;           // CUDA ≤ 12 signature
    public static delegate* unmanaged<ulong, nuint, MemLocation, uint, IntPtr, int> cuMemPrefetchAsyncV2; // CUDA ≥ 12.2
    public static delegate* unmanaged<void*, int, ulong, int> cuPointerGetAttribute;
    public static delegate* unmanaged<IntPtr, int> cuStreamSynchronize;
    public static delegate* unmanaged<int> cuProfilerStart, cuProfilerStop; // may be absent (null)

    /// <summary>Loads libcuda and calls cuInit once; null when that worked, else why not.</summary>
    public static string? EnsureLoaded() => loadError.Value;

    // Binds on first use where a caller did not ask EnsureLoaded first (every context switch starts at PrimaryContext):
    // a call through an unbound pointer would crash the process instead of naming the cause.
    private static void EnsureBound()
    {
        if (EnsureLoaded() is { } why) throw new TorchException(TorchErrorKind.Generic, $"the CUDA driver is unavailable: {why}");
    }

    private static void Bind()
    {
        if (!NativeLibrary.TryLoad("libcuda.so.1", out var lib) && !NativeLibrary.TryLoad("libcuda.so", out lib) &&
            !NativeLibrary.TryLoad("nvcuda.dll", out lib))
            throw new InvalidOperationException("the CUDA driver library (libcuda.so.1) is not installed");
        IntPtr Sym(string name) => NativeLibrary.TryGetExport(lib, name, out var p)
            ? p
            : throw new InvalidOperationException($"the CUDA driver library has no {name}; update the NVIDIA driver");
        IntPtr Optional(string name) => NativeLibrary.TryGetExport(lib, name, out var p) ? p : IntPtr.Zero;

        cuInit = (delegate* unmanaged<uint, int>)Sym("cuInit");
        cuDriverGetVersion = (delegate* unmanaged<int*, int>)Sym("cuDriverGetVersion");
        cuDeviceGetCount = (delegate* unmanaged<int*, int>)Sym("cuDeviceGetCount");
        cuDeviceGet = (delegate* unmanaged<int*, int, int>)Sym("cuDeviceGet");
        cuDeviceGetAttribute = (delegate* unmanaged<int*, int, int, int>)Sym("cuDeviceGetAttribute");
        cuDevicePrimaryCtxRetain = (delegate* unmanaged<IntPtr*, int, int>)Sym("cuDevicePrimaryCtxRetain");
        cuCtxGetCurrent = (delegate* unmanaged<IntPtr*, int>)Sym("cuCtxGetCurrent");
        cuCtxSetCurrent = (delegate* unmanaged<IntPtr, int>)Sym("cuCtxSetCurrent");
        cuModuleLoadData = (delegate* unmanaged<IntPtr*, void*, int>)Sym("cuModuleLoadData");
        cuModuleGetFunction = (delegate* unmanaged<IntPtr*, IntPtr, byte*, int>)Sym("cuModuleGetFunction");
        cuFuncSetAttribute = (delegate* unmanaged<IntPtr, int, int, int>)Sym("cuFuncSetAttribute");
        cuFuncGetAttribute = (delegate* unmanaged<int*, int, IntPtr, int>)Sym("cuFuncGetAttribute");
        cuLaunchKernel = (delegate* unmanaged<IntPtr, uint, uint, uint, uint, uint, uint, uint, IntPtr, void**, void**, int>)Sym("cuLaunchKernel");
        cuLaunchKernelEx = (delegate* unmanaged<LaunchConfig*, IntPtr, void**, void**, int>)Optional("cuLaunchKernelEx");
        cuGetErrorString = (delegate* unmanaged<int, byte**, int>)Sym("cuGetErrorString");
        cuGetErrorName = (delegate* unmanaged<int, byte**, int>)Sym("cuGetErrorName");
        cuMemAllocManaged = (delegate* unmanaged<ulong*, nuint, uint, int>)Sym("cuMemAllocManaged");
        cuMemFree = (delegate* unmanaged<ulong, int>)Sym("cuMemFree_v2");
        cuMemGetInfo = (delegate* unmanaged<nuint*, nuint*, int>)Sym("cuMemGetInfo_v2");
        cuMemsetD8Async = (delegate* unmanaged<ulong, byte, nuint, IntPtr, int>)Sym("cuMemsetD8Async");
        cuMemcpyAsync = (delegate* unmanaged<ulong, ulong, nuint, IntPtr, int>)Sym("cuMemcpyAsync");
        cuPointerGetAttribute = (delegate* unmanaged<void*, int, ulong, int>)Sym("cuPointerGetAttribute");
        cuStreamSynchronize = (delegate* unmanaged<IntPtr, int>)Sym("cuStreamSynchronize");
        cuProfilerStart = (delegate* unmanaged<int>)Optional("cuProfilerStart");
        cuProfilerStop = (delegate* unmanaged<int>)Optional("cuProfilerStop");
        // The exported "cuMemPrefetchAsync" keeps its CUDA 8 signature in every driver; CUDA 12.2+ drivers add _v2
        // (a CUmemLocation), which CUDA 13 headers map cuMemPrefetchAsync to. Prefer _v2 where the driver has it.
        cuMemPrefetchAsyncV2 = (delegate* unmanaged<ulong, nuint, MemLocation, uint, IntPtr, int>)Optional("cuMemPrefetchAsync_v2");
        cuMemPrefetchAsync = (delegate* unmanaged<ulong, nuint, int, IntPtr, int>)Optional("cuMemPrefetchAsync");

        var status = cuInit(0);
        if (status != Success) throw new InvalidOperationException($"cuInit failed: {ErrorText(status)}");
        int count;
        Check(cuDeviceGetCount(&count), "cuDeviceGetCount");
        if (count == 0) throw new InvalidOperationException("the CUDA driver sees no GPU");
    }

    /// <summary>"CUDA_ERROR_OUT_OF_MEMORY: out of memory" for a CUresult.</summary>
    public static string ErrorText(int status)
    {
        byte* name = null, text = null;
        if (cuGetErrorName != null) cuGetErrorName(status, &name);
        if (cuGetErrorString != null) cuGetErrorString(status, &text);
        var n = name != null ? Marshal.PtrToStringUTF8((IntPtr)name) : $"CUresult {status}";
        var t = text != null ? Marshal.PtrToStringUTF8((IntPtr)text) : null;
        return t is null ? n! : $"{n}: {t}";
    }

    /// <summary>Throws a <see cref="TorchException"/> (out-of-memory typed as such) for a failed call.</summary>
    public static void Check(int status, string what)
    {
        if (status == Success) return;
        var message = $"{what} failed: {ErrorText(status)}";
        if (status == ErrorOutOfMemory) throw new OutOfMemoryTorchException(message);
        throw new TorchException(TorchErrorKind.Generic, message);
    }

    public static int DeviceCount()
    {
        EnsureBound();
        int count;
        Check(cuDeviceGetCount(&count), "cuDeviceGetCount");
        return count;
    }

    public static int Attribute(int device, int attribute)
    {
        EnsureBound();
        int dev, value;
        Check(cuDeviceGet(&dev, device), "cuDeviceGet");
        Check(cuDeviceGetAttribute(&value, attribute, dev), "cuDeviceGetAttribute");
        return value;
    }

    /// <summary>The primary context of a device (retained once and kept for the process).</summary>
    public static IntPtr PrimaryContext(int device)
    {
        lock (primaryContexts)
        {
            if (primaryContexts.TryGetValue(device, out var ctx)) return ctx;
            EnsureBound();
            int dev;
            Check(cuDeviceGet(&dev, device), "cuDeviceGet");
            Check(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
            primaryContexts[device] = ctx;
            return ctx;
        }
    }

    /// <summary>
    /// Makes the device's primary context current on this thread until disposed, then restores the previous one (a
    /// libtorch thread keeps the device libtorch set). Usually a no-op: libtorch has already made it current.
    /// </summary>
    public static ContextScope OnDevice(int device) => new(PrimaryContext(device));

    public readonly struct ContextScope : IDisposable
    {
        private readonly IntPtr previous;
        private readonly bool switched;

        public ContextScope(IntPtr context)
        {
            IntPtr current;
            Check(cuCtxGetCurrent(&current), "cuCtxGetCurrent");
            previous = current;
            switched = current != context;
            if (switched) Check(cuCtxSetCurrent(context), "cuCtxSetCurrent");
        }

        public void Dispose()
        {
            if (switched) cuCtxSetCurrent(previous);
        }
    }
}
