using System.Runtime.InteropServices;
using System.Text;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// The few CUDA runtime and driver calls torchx.cuda needs, bound at run time to the libcudart and libcuda that the loaded
/// libtorch uses (found in /proc/self/maps), so no second CUDA runtime is loaded and nothing needs libtorch's C++ ABI.
/// </summary>
internal static unsafe class CudaRuntime
{
    // cudaMemPoolAttr values (CUDA 11.2+): cuuint64_t attributes of a memory pool.
    public const int cudaMemPoolAttrReservedMemCurrent = 5;
    public const int cudaMemPoolAttrReservedMemHigh = 6;
    public const int cudaMemPoolAttrUsedMemCurrent = 7;
    public const int cudaMemPoolAttrUsedMemHigh = 8;

    private static readonly object gate = new();
    private static Api? bound;

    /// <summary>The bound functions, or null while no CUDA runtime is in the process (CPU libtorch, CUDA not initialised).</summary>
    public static Api? Functions
    {
        get
        {
            if (bound is not null) return bound;
            lock (gate) return bound ??= Bind();
        }
    }

    /// <summary>Path of the libcudart in use, or null.</summary>
    public static string? RuntimePath => Functions?.RuntimePath;

    internal sealed class Api
    {
        public required string RuntimePath { get; init; }
        public required delegate* unmanaged<int*, int> GetDevice;
        public required delegate* unmanaged<int, int> SetDevice;
        public required delegate* unmanaged<int*, int> GetDeviceCount;
        public required delegate* unmanaged<nuint*, nuint*, int> MemGetInfo;
        public required delegate* unmanaged<int> DeviceSynchronize;
        public required delegate* unmanaged<int*, int> RuntimeGetVersion;
        public required delegate* unmanaged<int*, int> DriverGetVersion;
        public required delegate* unmanaged<IntPtr*, int, int> DeviceGetDefaultMemPool;
        public required delegate* unmanaged<IntPtr, int, void*, int> MemPoolGetAttribute;
        public required delegate* unmanaged<IntPtr, int, void*, int> MemPoolSetAttribute;
        public required delegate* unmanaged<IntPtr, nuint, int> MemPoolTrimTo;
        public required delegate* unmanaged<int, IntPtr> GetErrorString;
        public delegate* unmanaged<byte*, int, int, int> DeviceGetName; // libcuda's cuDeviceGetName; may be absent

        public void Check(int status, string call)
        {
            if (status == 0) return;
            var message = Marshal.PtrToStringAnsi(GetErrorString(status)) ?? $"error {status}";
            throw new TorchException(status == 2 ? TorchErrorKind.OutOfMemory : TorchErrorKind.Generic, $"{call} failed: {message}");
        }

        /// <summary>Runs <paramref name="body"/> with <paramref name="device"/> current, then restores the previous device.</summary>
        public T OnDevice<T>(int device, Func<T> body)
        {
            int previous;
            Check(GetDevice(&previous), "cudaGetDevice");
            if (previous != device) Check(SetDevice(device), "cudaSetDevice");
            try
            {
                return body();
            }
            finally
            {
                if (previous != device) SetDevice(previous);
            }
        }

        public ulong PoolAttribute(int device, int attribute)
        {
            IntPtr pool;
            Check(DeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool");
            ulong value;
            Check(MemPoolGetAttribute(pool, attribute, &value), "cudaMemPoolGetAttribute");
            return value;
        }

        public void ResetPoolHigh(int device, int attribute)
        {
            IntPtr pool;
            Check(DeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool");
            ulong zero = 0; // the high-water attributes can only be reset to 0 (= the current value)
            Check(MemPoolSetAttribute(pool, attribute, &zero), "cudaMemPoolSetAttribute");
        }

        public void TrimPool(int device)
        {
            IntPtr pool;
            Check(DeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool");
            Check(MemPoolTrimTo(pool, 0), "cudaMemPoolTrimTo");
        }

        public string DeviceName(int device)
        {
            if (DeviceGetName == null) return $"cuda:{device}";
            var buffer = stackalloc byte[256];
            if (DeviceGetName(buffer, 256, device) != 0) return $"cuda:{device}";
            return Marshal.PtrToStringUTF8((IntPtr)buffer) ?? $"cuda:{device}";
        }
    }

    private static Api? Bind()
    {
        // libtorch_cuda has loaded its libcudart by now if CUDA is in use (TorchRuntime.Initialize / torch.cuda.is_available()).
        var path = LoadedLibraries.Find("libcudart").FirstOrDefault(p => p.Contains(".so"));
        if (path is null || !NativeLibrary.TryLoad(path, out var rt)) return null;
        IntPtr Sym(string name) => NativeLibrary.GetExport(rt, name);
        var api = new Api
        {
            RuntimePath = path,
            GetDevice = (delegate* unmanaged<int*, int>)Sym("cudaGetDevice"),
            SetDevice = (delegate* unmanaged<int, int>)Sym("cudaSetDevice"),
            GetDeviceCount = (delegate* unmanaged<int*, int>)Sym("cudaGetDeviceCount"),
            MemGetInfo = (delegate* unmanaged<nuint*, nuint*, int>)Sym("cudaMemGetInfo"),
            DeviceSynchronize = (delegate* unmanaged<int>)Sym("cudaDeviceSynchronize"),
            RuntimeGetVersion = (delegate* unmanaged<int*, int>)Sym("cudaRuntimeGetVersion"),
            DriverGetVersion = (delegate* unmanaged<int*, int>)Sym("cudaDriverGetVersion"),
            DeviceGetDefaultMemPool = (delegate* unmanaged<IntPtr*, int, int>)Sym("cudaDeviceGetDefaultMemPool"),
            MemPoolGetAttribute = (delegate* unmanaged<IntPtr, int, void*, int>)Sym("cudaMemPoolGetAttribute"),
            MemPoolSetAttribute = (delegate* unmanaged<IntPtr, int, void*, int>)Sym("cudaMemPoolSetAttribute"),
            MemPoolTrimTo = (delegate* unmanaged<IntPtr, nuint, int>)Sym("cudaMemPoolTrimTo"),
            GetErrorString = (delegate* unmanaged<int, IntPtr>)Sym("cudaGetErrorString"),
        };
        // The driver is loaded by the runtime; cuDeviceGetName takes a CUdevice, which equals the runtime ordinal
        // unless CUDA_VISIBLE_DEVICES reorders nothing further (the runtime and driver see the same visible list).
        if (NativeLibrary.TryLoad("libcuda.so.1", out var driver) && NativeLibrary.TryGetExport(driver, "cuDeviceGetName", out var getName))
            api.DeviceGetName = (delegate* unmanaged<byte*, int, int, int>)getName;
        return api;
    }

    /// <summary>"13.0" from 13000.</summary>
    public static string FormatVersion(int v) => $"{v / 1000}.{v % 1000 / 10}";
}
