using System.Runtime.InteropServices;
using System.Text;

namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>
/// NVRTC, CUDA's run-time compiler (libnvrtc), which CUDA builds of PyTorch and libtorch ship: our kernels are CUDA C
/// sources compiled here for the GPU in use, so users need no CUDA toolkit and nothing is prebuilt per architecture.
/// </summary>
internal static unsafe class Nvrtc
{
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

    private static delegate* unmanaged<int*, int*, int> nvrtcVersion;
    private static delegate* unmanaged<IntPtr*, byte*, byte*, int, byte**, byte**, int> nvrtcCreateProgram;
    private static delegate* unmanaged<IntPtr, int, byte**, int> nvrtcCompileProgram;
    private static delegate* unmanaged<IntPtr, nuint*, int> nvrtcGetProgramLogSize;
    private static delegate* unmanaged<IntPtr, byte*, int> nvrtcGetProgramLog;
    private static delegate* unmanaged<IntPtr, nuint*, int> nvrtcGetCUBINSize;
    private static delegate* unmanaged<IntPtr, byte*, int> nvrtcGetCUBIN;
    private static delegate* unmanaged<IntPtr, nuint*, int> nvrtcGetPTXSize;
    private static delegate* unmanaged<IntPtr, byte*, int> nvrtcGetPTX;
    private static delegate* unmanaged<IntPtr*, int> nvrtcDestroyProgram;
    private static delegate* unmanaged<int, byte*> nvrtcGetErrorString;
    private static delegate* unmanaged<int*, int> nvrtcGetNumSupportedArchs;
    private static delegate* unmanaged<int*, int> nvrtcGetSupportedArchs;

    /// <summary>Path of the libnvrtc in use (after <see cref="EnsureLoaded"/> succeeded).</summary>
    public static string? LibraryPath { get; private set; }

    /// <summary>"12.8" after loading.</summary>
    public static string Version { get; private set; } = "";

    private static int[] supportedArchs = [];

    /// <summary>Finds and loads libnvrtc once; null when that worked, else what was tried.</summary>
    public static string? EnsureLoaded() => loadError.Value;

    private static void Bind()
    {
        var tried = new List<string>();
        IntPtr lib = IntPtr.Zero;
        foreach (var candidate in NvrtcLocator.Candidates())
        {
            tried.Add(candidate);
            // NVRTC loads its builtins library (libnvrtc-builtins.so.X.Y) by name at compile time; loading the one next to
            // it first makes that lookup find it whatever LD_LIBRARY_PATH says.
            if (Path.IsPathRooted(candidate))
                foreach (var builtins in NvrtcLocator.BuiltinsNextTo(candidate)) NativeLibrary.TryLoad(builtins, out _);
            if (NativeLibrary.TryLoad(candidate, out lib))
            {
                LibraryPath = candidate;
                break;
            }
        }
        if (lib == IntPtr.Zero)
            throw new InvalidOperationException(
                "NVRTC (libnvrtc) was not found; CUDA builds of PyTorch and libtorch ship it. Tried: " + string.Join(", ", tried) +
                ". Set LORAHUB_NVRTC to the libnvrtc.so file to use.");
        IntPtr Sym(string name) => NativeLibrary.TryGetExport(lib, name, out var p)
            ? p
            : throw new InvalidOperationException($"{LibraryPath} has no {name} (NVRTC 11.2 or newer is needed)");
        nvrtcVersion = (delegate* unmanaged<int*, int*, int>)Sym("nvrtcVersion");
        nvrtcCreateProgram = (delegate* unmanaged<IntPtr*, byte*, byte*, int, byte**, byte**, int>)Sym("nvrtcCreateProgram");
        nvrtcCompileProgram = (delegate* unmanaged<IntPtr, int, byte**, int>)Sym("nvrtcCompileProgram");
        nvrtcGetProgramLogSize = (delegate* unmanaged<IntPtr, nuint*, int>)Sym("nvrtcGetProgramLogSize");
        nvrtcGetProgramLog = (delegate* unmanaged<IntPtr, byte*, int>)Sym("nvrtcGetProgramLog");
        nvrtcGetCUBINSize = (delegate* unmanaged<IntPtr, nuint*, int>)Sym("nvrtcGetCUBINSize");
        nvrtcGetCUBIN = (delegate* unmanaged<IntPtr, byte*, int>)Sym("nvrtcGetCUBIN");
        nvrtcGetPTXSize = (delegate* unmanaged<IntPtr, nuint*, int>)Sym("nvrtcGetPTXSize");
        nvrtcGetPTX = (delegate* unmanaged<IntPtr, byte*, int>)Sym("nvrtcGetPTX");
        nvrtcDestroyProgram = (delegate* unmanaged<IntPtr*, int>)Sym("nvrtcDestroyProgram");
        nvrtcGetErrorString = (delegate* unmanaged<int, byte*>)Sym("nvrtcGetErrorString");
        nvrtcGetNumSupportedArchs = (delegate* unmanaged<int*, int>)Sym("nvrtcGetNumSupportedArchs");
        nvrtcGetSupportedArchs = (delegate* unmanaged<int*, int>)Sym("nvrtcGetSupportedArchs");
        int major, minor, n;
        Check(nvrtcVersion(&major, &minor), "nvrtcVersion");
        Version = $"{major}.{minor}";
        Check(nvrtcGetNumSupportedArchs(&n), "nvrtcGetNumSupportedArchs");
        var archs = new int[n];
        fixed (int* a = archs) Check(nvrtcGetSupportedArchs(a), "nvrtcGetSupportedArchs");
        supportedArchs = archs;
    }

    private static void Check(int status, string what)
    {
        if (status == 0) return;
        var text = nvrtcGetErrorString != null ? Marshal.PtrToStringUTF8((IntPtr)nvrtcGetErrorString(status)) : null;
        throw new InvalidOperationException($"{what} failed: {text ?? "NVRTC error " + status}");
    }

    /// <summary>
    /// Compiles <paramref name="source"/> for compute capability <paramref name="arch"/> (e.g. 90): a CUBIN when this NVRTC
    /// knows the architecture, else PTX for the newest one it knows below it (the driver finishes the compilation).
    /// Returns the image for cuModuleLoadData (PTX NUL-terminated). A compile error throws with NVRTC's log.
    /// </summary>
    public static byte[] Compile(string name, string source, IReadOnlyDictionary<string, string> headers, int arch, IEnumerable<string> extraOptions)
    {
        // Loaded here too: a program compiled before anything asked CudaKernels.Available would otherwise see no
        // architectures and report a misleading failure.
        if (EnsureLoaded() is { } unavailable) throw new InvalidOperationException("NVRTC is unavailable: " + unavailable);
        var cubin = supportedArchs.Contains(arch);
        var target = cubin ? arch : supportedArchs.Where(a => a <= arch).DefaultIfEmpty(0).Max();
        if (target == 0)
            throw new InvalidOperationException($"NVRTC {Version} cannot compile for compute capability {arch / 10}.{arch % 10} (it knows {string.Join(", ", supportedArchs)})");
        var options = new List<string> { cubin ? $"--gpu-architecture=sm_{target}" : $"--gpu-architecture=compute_{target}", "--std=c++17" };
        options.AddRange(extraOptions);

        var allocations = new List<IntPtr>();
        byte* Utf8(string s)
        {
            var bytes = Encoding.UTF8.GetBytes(s + "\0");
            var p = Marshal.AllocHGlobal(bytes.Length);
            Marshal.Copy(bytes, 0, p, bytes.Length);
            allocations.Add(p);
            return (byte*)p;
        }
        IntPtr program = IntPtr.Zero;
        try
        {
            var headerNames = headers.Keys.ToArray();
            var headerTexts = stackalloc byte*[Math.Max(1, headerNames.Length)];
            var headerIncludes = stackalloc byte*[Math.Max(1, headerNames.Length)];
            for (var i = 0; i < headerNames.Length; i++)
            {
                headerTexts[i] = Utf8(headers[headerNames[i]]);
                headerIncludes[i] = Utf8(headerNames[i]);
            }
            Check(nvrtcCreateProgram(&program, Utf8(source), Utf8(name), headerNames.Length, headerTexts, headerIncludes), "nvrtcCreateProgram");
            var opts = stackalloc byte*[options.Count];
            for (var i = 0; i < options.Count; i++) opts[i] = Utf8(options[i]);
            var status = nvrtcCompileProgram(program, options.Count, opts);
            if (status != 0)
                throw new InvalidOperationException(
                    $"NVRTC {Version} failed to compile {name} for {options[0]}:{Environment.NewLine}{Log(program)}");
            nuint size;
            byte[] image;
            if (cubin)
            {
                Check(nvrtcGetCUBINSize(program, &size), "nvrtcGetCUBINSize");
                image = new byte[(int)size];
                fixed (byte* p = image) Check(nvrtcGetCUBIN(program, p), "nvrtcGetCUBIN");
            }
            else
            {
                Check(nvrtcGetPTXSize(program, &size), "nvrtcGetPTXSize"); // includes the terminating NUL
                image = new byte[(int)size];
                fixed (byte* p = image) Check(nvrtcGetPTX(program, p), "nvrtcGetPTX");
            }
            return image;
        }
        finally
        {
            if (program != IntPtr.Zero) nvrtcDestroyProgram(&program);
            foreach (var p in allocations) Marshal.FreeHGlobal(p);
        }
    }

    private static string Log(IntPtr program)
    {
        nuint size;
        if (nvrtcGetProgramLogSize(program, &size) != 0 || size <= 1) return "(no log)";
        var buffer = new byte[(int)size];
        fixed (byte* p = buffer)
        {
            nvrtcGetProgramLog(program, p);
            return Marshal.PtrToStringUTF8((IntPtr)p) ?? "";
        }
    }
}
