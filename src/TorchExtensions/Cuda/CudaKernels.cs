using System.Reflection;

namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>
/// Our CUDA kernels: CUDA C sources compiled at run time with NVRTC for the GPU in use and launched through the CUDA
/// driver on raw tensor pointers, on the legacy default stream libtorch computes on. Nothing crosses a C++ boundary, so
/// they work with whichever libtorch TorchSharp loaded. <see cref="Available"/> says whether they can run here (a CUDA
/// driver and NVRTC were found); every op that uses them has a composite TorchSharp path for where they cannot.
/// </summary>
public static class CudaKernels
{
    private static long launches;
    private static readonly Lazy<string?> reason = new(Probe);
    private static string? disabled;
    private static readonly Dictionary<(int device, int attribute), int> attributes = new();

    /// <summary>True when the kernels can run: the CUDA driver and NVRTC were loaded and a GPU is visible.</summary>
    public static bool Available => reason.Value is null && disabled is null;

    /// <summary>Why the kernels cannot run (null when <see cref="Available"/>).</summary>
    public static string? UnavailableReason => reason.Value ?? disabled;

    /// <summary>Turns the kernels off for the rest of the process (a program failed to compile or load); says so once on stderr.</summary>
    internal static void Disable(string why)
    {
        if (Interlocked.CompareExchange(ref disabled, why, null) is null)
            Console.Error.WriteLine($"LoRAHub: CUDA kernels turned off, the composite ops run instead: {why}");
    }

    /// <summary>Kernel launches so far in this process (every kernel, forward and backward): tests use it to prove a kernel ran.</summary>
    public static long LaunchCount => Interlocked.Read(ref launches);

    /// <summary>One line for diagnostics: the NVRTC in use, or why the kernels are off.</summary>
    public static string Describe() =>
        Available
            ? $"NVRTC {Nvrtc.Version} ({Nvrtc.LibraryPath}), CUDA driver API, " +
              (Cublas.UnavailableReason is { } noBlas ? $"no cuBLAS ({noBlas}: DoRA's norms take the FMA kernels)" : $"cuBLAS {Cublas.Version ?? "(version unknown)"}")
            : $"off: {UnavailableReason}";

    /// <summary>
    /// Whether lh_common's bf16 rounding (float_to_bf16, lh_round_pair) takes bit operations on every architecture
    /// (LORAHUB_BF16_BIT_ROUNDING=1, for measuring) instead of the hardware's conversions on sm_80+: the same bits but for
    /// NaN payloads. Read once, before the first program compiles (it is part of the header, so of the kernel cache's key).
    /// </summary>
    public static bool BitRoundingBf16 { get; } = Environment.GetEnvironmentVariable("LORAHUB_BF16_BIT_ROUNDING")?.Trim() == "1";

    // The macro lh_common's bf16 rounding tests (defined ahead of the header's text where BitRoundingBf16).
    internal const string BitRoundingMacro = "LH_BF16_BIT_ROUNDING";

    /// <summary>
    /// The headers every program may include: "lh_common.cuh" (16-bit float conversions, vector packs, reductions) and
    /// "lh_mma.cuh" (tensor-core mma, ldmatrix and cp.async wrappers, sm_80+; after lh_common.cuh) and
    /// "lh_lowrank_epilogue.cuh" (a LoRA update and row scale c applied per element after a base GEMM; after lh_common.cuh).
    /// </summary>
    public static IReadOnlyDictionary<string, string> Headers { get; } = new Dictionary<string, string>
    {
        ["lh_common.cuh"] = (BitRoundingBf16 ? $"#define {BitRoundingMacro}\n" : "") + EmbeddedSource("lh_common.cu"),
        ["lh_mma.cuh"] = EmbeddedSource("lh_mma.cu"),
        ["lh_lowrank_epilogue.cuh"] = EmbeddedSource("lh_lowrank_epilogue.cu"),
    };

    /// <summary>Compute capability of a device as major·10 + minor (90 for an H100/H200).</summary>
    public static int ComputeCapability(int device) =>
        Attribute(device, CudaDriver.AttrComputeCapabilityMajor) * 10 + Attribute(device, CudaDriver.AttrComputeCapabilityMinor);

    /// <summary>Number of streaming multiprocessors of a device (for grid sizes).</summary>
    public static int MultiprocessorCount(int device) => Attribute(device, CudaDriver.AttrMultiprocessorCount);

    /// <summary>Bytes of L2 cache of a device (50 MB on an H100/H200).</summary>
    public static long L2CacheBytes(int device) => Attribute(device, CudaDriver.AttrL2CacheSize);

    /// <summary>Throws the reason when the kernels cannot run.</summary>
    public static void EnsureAvailable()
    {
        if (reason.Value is { } r) throw new TorchException(TorchErrorKind.Generic, "LoRAHub's CUDA kernels are unavailable: " + r);
        if (disabled is { } d) throw new KernelCompileException("LoRAHub's CUDA kernels are off: " + d);
    }

    internal static int Attribute(int device, int attribute)
    {
        if (CudaDriver.EnsureLoaded() is { } driver) throw new TorchException(TorchErrorKind.Generic, "the CUDA driver is unavailable: " + driver);
        lock (attributes)
        {
            if (attributes.TryGetValue((device, attribute), out var v)) return v;
            return attributes[(device, attribute)] = CudaDriver.Attribute(device, attribute);
        }
    }

    internal static void CountLaunch() => Interlocked.Increment(ref launches);

    /// <summary>A .cu file embedded in this assembly (Kernels/*.cu).</summary>
    internal static string EmbeddedSource(string file)
    {
        using var stream = typeof(CudaKernels).Assembly.GetManifestResourceStream("LoRAHub.Kernels." + file)
            ?? throw new InvalidOperationException($"kernel source {file} is not embedded in {typeof(CudaKernels).Assembly.GetName().Name}");
        using var reader = new StreamReader(stream);
        return reader.ReadToEnd();
    }

    private static string? Probe()
    {
        if (CudaDriver.EnsureLoaded() is { } driver) return driver;
        if (Nvrtc.EnsureLoaded() is { } nvrtc) return nvrtc;
        return null;
    }
}
