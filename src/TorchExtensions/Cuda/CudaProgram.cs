using System.Runtime.InteropServices;

namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>
/// A CUDA C source whose kernels are compiled on first use, once per GPU architecture, and loaded once per device.
/// Kernels are <c>extern "C" __global__</c> functions (looked up by name); the source may include
/// <see cref="CudaKernels.Headers"/> ("lh_common.cuh") and must include no CUDA toolkit header (NVRTC's differ between
/// versions). Thread-safe; a compile error throws with NVRTC's log.
/// </summary>
public sealed class CudaProgram
{
    private readonly string source;
    private readonly IReadOnlyDictionary<string, string> headers;
    private readonly string[] options;
    private readonly Dictionary<int, byte[]> images = new();
    private readonly Dictionary<int, IntPtr> modules = new();
    private readonly Dictionary<(int, string), CudaFunction> functions = new();

    /// <param name="name">The program's name (in compile errors and the kernel cache).</param>
    /// <param name="source">CUDA C source of <c>extern "C" __global__</c> kernels.</param>
    /// <param name="headers">Headers it may include (default <see cref="CudaKernels.Headers"/>).</param>
    /// <param name="options">Extra NVRTC options.</param>
    /// <param name="dependentLaunch">
    /// Every kernel starts with lh_grid_dependency_sync() (checked here: an <see cref="ArgumentException"/> names a kernel
    /// that does not), so its launches may be programmatic dependent launches (<see cref="DependentLaunch"/>).
    /// </param>
    public CudaProgram(string name, string source, IReadOnlyDictionary<string, string>? headers = null, IEnumerable<string>? options = null,
        bool dependentLaunch = false)
    {
        if (dependentLaunch) DependentLaunch.Check(name, source);
        Name = name;
        this.source = source;
        this.headers = headers ?? CudaKernels.Headers;
        this.options = options?.ToArray() ?? [];
        DependentLaunches = dependentLaunch;
    }

    /// <summary>The program's name (in compile errors).</summary>
    public string Name { get; }

    /// <summary>Whether its kernels may take programmatic dependent launches (built with dependentLaunch).</summary>
    public bool DependentLaunches { get; }

    // Turns the kernels off (later calls take the composite ops) and reports the failure to this call.
    private static KernelCompileException Failed(string why, Exception? inner)
    {
        CudaKernels.Disable(why);
        return new KernelCompileException(why, inner);
    }

    private readonly Dictionary<int, bool> compiles = new();

    /// <summary>Why <see cref="Compiles"/> turned this program off (null: it compiled, or was not tried).</summary>
    public string? CompileFailure { get; private set; }

    /// <summary>
    /// Whether this program compiles for the device's architecture, for kernels that have a composite fallback of their
    /// own: tried once per architecture before first use (the image goes to the kernel cache, so <see cref="Function"/>
    /// does not compile again). A failure turns off only this program — not every LoRAHub kernel, as a compile error
    /// inside <see cref="Function"/> does — keeps NVRTC's message in <see cref="CompileFailure"/> and says on stderr
    /// what runs instead (<paramref name="instead"/>, e.g. "tensor ops run instead").
    /// </summary>
    public bool Compiles(int device, string instead)
    {
        lock (compiles)
        {
            var arch = CudaKernels.ComputeCapability(device);
            if (compiles.TryGetValue(arch, out var ok)) return ok;
            try
            {
                var key = KernelCache.Key(Name, source, headers, arch, options);
                if (KernelCache.Load(key) is null) KernelCache.Store(key, Nvrtc.Compile(Name, source, headers, arch, options));
                ok = true;
            }
            catch (Exception e)
            {
                CompileFailure = $"{Name}: {e.Message}";
                Console.Error.WriteLine($"LoRAHub: {Name} did not compile; {instead} ({e.Message})");
                ok = false;
            }
            return compiles[arch] = ok;
        }
    }

    /// <summary>An embedded Kernels/*.cu file of this assembly as a program.</summary>
    internal static CudaProgram Embedded(string file, bool dependentLaunch = false) =>
        new(file, CudaKernels.EmbeddedSource(file), dependentLaunch: dependentLaunch);

    /// <summary>The kernel <paramref name="kernel"/> on CUDA device <paramref name="device"/>, compiling and loading as needed.</summary>
    public CudaFunction Function(int device, string kernel)
    {
        lock (functions)
        {
            if (functions.TryGetValue((device, kernel), out var f)) return f;
            CudaKernels.EnsureAvailable();
            var module = Module(device);
            IntPtr handle;
            var name = Marshal.StringToHGlobalAnsi(kernel);
            try
            {
                using var _ = CudaDriver.OnDevice(device);
                unsafe { CudaDriver.Check(CudaDriver.cuModuleGetFunction(&handle, module, (byte*)name), $"cuModuleGetFunction({Name}: {kernel})"); }
            }
            finally
            {
                Marshal.FreeHGlobal(name);
            }
            // The device's capability once here, not at every launch.
            return functions[(device, kernel)] = new CudaFunction(kernel, device, handle)
            {
                Dependent = DependentLaunches && CudaKernels.ComputeCapability(device) >= 90,
            };
        }
    }

    private unsafe IntPtr Module(int device)
    {
        if (modules.TryGetValue(device, out var module)) return module;
        var arch = CudaKernels.ComputeCapability(device);
        using var _ = CudaDriver.OnDevice(device);
        if (!images.TryGetValue(arch, out var image))
        {
            // A cached image from an earlier process, unless the driver refuses it (then it is compiled afresh).
            var key = KernelCache.Key(Name, source, headers, arch, options);
            if (KernelCache.Load(key) is { } cached)
            {
                fixed (byte* p = cached)
                    if (CudaDriver.cuModuleLoadData(&module, p) == CudaDriver.Success)
                    {
                        images[arch] = cached;
                        return modules[device] = module;
                    }
            }
            try
            {
                image = Nvrtc.Compile(Name, source, headers, arch, options);
            }
            catch (InvalidOperationException e)
            {
                throw Failed($"compiling {Name} for compute capability {arch / 10}.{arch % 10} failed: {e.Message}", e);
            }
            images[arch] = image;
            KernelCache.Store(key, image);
        }
        int status;
        fixed (byte* p = image) status = CudaDriver.cuModuleLoadData(&module, p);
        if (status != CudaDriver.Success)
            throw Failed($"the CUDA driver could not load {Name}: {CudaDriver.ErrorText(status)}", null);
        return modules[device] = module;
    }
}
