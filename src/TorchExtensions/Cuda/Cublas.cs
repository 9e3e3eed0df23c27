using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>
/// The cuBLAS calls our kernels' neighbours need (batched GEMMs with pointer arrays, mixed precision), bound at run time
/// to the cuBLAS that libtorch itself loaded (the same soname; else the one mapped into the process), so nothing here
/// ships or picks a second copy. One handle per device and stream, each with its own workspace from libtorch's allocator
/// (a handle must not share a workspace between streams that run at once).
/// </summary>
internal static unsafe class Cublas
{
    // cublasOperation_t, cudaDataType_t, cublasComputeType_t, cublasGemmAlgo_t.
    public const int OpN = 0, OpT = 1;
    public const int R32F = 0, R16BF = 14;
    public const int Compute32F = 68;
    private const int GemmDefault = -1;
    private const int StatusNotSupported = 15;

    // The workspace a handle gets: cuBLAS asks for up to 32 MiB on Hopper for its split-K and stream-K kernels.
    private const long WorkspaceBytes = 32L << 20;

    private static delegate* unmanaged<IntPtr*, int> cublasCreate;
    private static delegate* unmanaged<IntPtr, IntPtr, int> cublasSetStream;
    private static delegate* unmanaged<IntPtr, IntPtr, nuint, int> cublasSetWorkspace;
    private static delegate* unmanaged<IntPtr, int, int, int, int, int, void*, IntPtr, int, int, IntPtr, int, int, void*, IntPtr, int, int, int,
        int, int, int> cublasGemmBatchedEx;
    private static delegate* unmanaged<int, byte*> cublasGetStatusString;
    private static delegate* unmanaged<int, int*, int> cublasGetProperty; // may be absent (null)

    private static readonly object gate = new();
    private static volatile bool bound;
    private static string? permanent; // a failure that asking again cannot mend (no driver, a function missing)

    private sealed record Handle(IntPtr Value, Tensor Workspace);

    private static readonly Dictionary<(int device, IntPtr stream), Handle> handles = new();

    /// <summary>
    /// Why cuBLAS cannot be called here (null: it can); binds on the first call that finds it. Not finding it is asked
    /// again next time (libtorch's CUDA libraries, which load it, may not be loaded yet), other failures are final.
    /// </summary>
    public static string? UnavailableReason
    {
        get
        {
            if (bound) return null;
            lock (gate)
            {
                if (bound) return null;
                if (permanent is not null) return permanent;
                if (CudaDriver.EnsureLoaded() is { } driver) return permanent = driver;
                if (Load() is not { } lib) return "cuBLAS is not loaded (libtorch's CUDA libraries load it; a CPU-only libtorch has none)";
                try
                {
                    Bind(lib);
                    bound = true;
                    return null;
                }
                catch (InvalidOperationException e)
                {
                    return permanent = e.Message;
                }
            }
        }
    }

    private static void Bind(IntPtr lib)
    {
        IntPtr Sym(string name) => NativeLibrary.TryGetExport(lib, name, out var p)
            ? p
            : throw new InvalidOperationException($"cuBLAS has no {name}; it is older than CUDA 11");
        cublasCreate = (delegate* unmanaged<IntPtr*, int>)Sym("cublasCreate_v2");
        cublasSetStream = (delegate* unmanaged<IntPtr, IntPtr, int>)Sym("cublasSetStream_v2");
        cublasSetWorkspace = (delegate* unmanaged<IntPtr, IntPtr, nuint, int>)Sym("cublasSetWorkspace_v2");
        cublasGemmBatchedEx = (delegate* unmanaged<IntPtr, int, int, int, int, int, void*, IntPtr, int, int, IntPtr, int, int, void*, IntPtr, int,
            int, int, int, int, int>)Sym("cublasGemmBatchedEx");
        cublasGetStatusString = (delegate* unmanaged<int, byte*>)Sym("cublasGetStatusString");
        cublasGetProperty = NativeLibrary.TryGetExport(lib, "cublasGetProperty", out var property) ? (delegate* unmanaged<int, int*, int>)property : null;
    }

    /// <summary>The bound cuBLAS's version ("13.1.0"; null where it cannot be called or does not say).</summary>
    public static string? Version
    {
        get
        {
            if (UnavailableReason is not null || cublasGetProperty == null) return null;
            int major, minor, patch; // libraryPropertyType: MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
            return cublasGetProperty(0, &major) == 0 && cublasGetProperty(1, &minor) == 0 && cublasGetProperty(2, &patch) == 0
                ? $"{major}.{minor}.{patch}"
                : null;
        }
    }

    // The cuBLAS libtorch loaded: by soname (the loader hands back the object already mapped), else by the path of any
    // libcublas mapped into this process (Linux).
    private static IntPtr? Load()
    {
        foreach (var name in new[] { "libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "cublas64_13.dll", "cublas64_12.dll", "cublas64_11.dll" })
            if (NativeLibrary.TryLoad(name, out var lib)) return lib;
        if (!OperatingSystem.IsLinux()) return null;
        try
        {
            foreach (var line in File.ReadLines("/proc/self/maps"))
            {
                var at = line.IndexOf('/');
                if (at >= 0 && Path.GetFileName(line[at..]).StartsWith("libcublas.so", StringComparison.Ordinal)
                    && NativeLibrary.TryLoad(line[at..], out var lib))
                    return lib;
            }
        }
        catch (IOException)
        {
        }
        return null;
    }

    private static string StatusText(int status)
    {
        var text = cublasGetStatusString != null ? cublasGetStatusString(status) : null;
        return text != null ? $"{Marshal.PtrToStringUTF8((IntPtr)text)} ({status})" : $"cublasStatus {status}";
    }

    private static void Check(int status, string what)
    {
        if (status == 0) return;
        var message = $"{what} failed: {StatusText(status)}";
        if (status == 3) throw new OutOfMemoryTorchException(message + "; free GPU memory or lower the batch size");
        throw new TorchException(TorchErrorKind.Generic, message);
    }

    // The handle for (device, stream), made on first use with its workspace on the device.
    private static Handle HandleFor(int device, IntPtr stream)
    {
        if (UnavailableReason is { } why) throw new InvalidOperationException($"cuBLAS: {why}");
        if (handles.TryGetValue((device, stream), out var h)) return h;
        using var _ = CudaDriver.OnDevice(device);
        IntPtr value;
        Check(cublasCreate(&value), "cublasCreate");
        var workspace = empty([WorkspaceBytes], ScalarType.Byte, new Device(DeviceType.CUDA, device)).DetachFromDisposeScope();
        Check(cublasSetStream(value, stream == CudaDriver.LegacyStream ? IntPtr.Zero : stream), "cublasSetStream");
        Check(cublasSetWorkspace(value, torchx.data_ptr(workspace), (nuint)WorkspaceBytes), "cublasSetWorkspace");
        return handles[(device, stream)] = new Handle(value, workspace);
    }

    /// <summary>
    /// C_i = op(A_i)·op(B_i) for i &lt; <paramref name="batch"/> (column-major, cuBLAS's convention: C_i is m × n with leading
    /// dimension <paramref name="ldc"/>), fp32 accumulation (<see cref="Compute32F"/>), enqueued on
    /// <paramref name="stream"/> of <paramref name="device"/>. <paramref name="aArray"/>, <paramref name="bArray"/> and
    /// <paramref name="cArray"/> are device arrays of <paramref name="batch"/> pointers. False when cuBLAS does not take
    /// this combination of types here (CUBLAS_STATUS_NOT_SUPPORTED: nothing ran); other failures throw.
    /// </summary>
    public static bool GemmBatched(int device, IntPtr stream, int transA, int transB, int m, int n, int k, IntPtr aArray, int aType, int lda,
        IntPtr bArray, int bType, int ldb, IntPtr cArray, int cType, int ldc, int batch)
    {
        float alpha = 1, beta = 0;
        lock (handles)
        {
            var h = HandleFor(device, stream);
            using var _ = CudaDriver.OnDevice(device);
            var status = cublasGemmBatchedEx(h.Value, transA, transB, m, n, k, &alpha, aArray, aType, lda, bArray, bType, ldb, &beta, cArray, cType,
                ldc, batch, Compute32F, GemmDefault);
            if (status == StatusNotSupported) return false;
            Check(status, $"cublasGemmBatchedEx ({m}×{n}×{k}, {batch} matrices)");
            return true;
        }
    }
}
