using System.Reflection;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using TorchSharp;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// Chooses and describes the libtorch this process runs on. Call <see cref="Initialize"/> at process start, before any
/// other TorchSharp call (the host, benchmarks and test assemblies do).
/// </summary>
/// <remarks>
/// Without <c>LORAHUB_LIBTORCH</c>, TorchSharp's own probing loads the libtorch beside the app (NuGet's CPU build, or
/// the TorchSharp CUDA packages where a user references them). With <c>LORAHUB_LIBTORCH</c> set to a torch folder (an
/// installed PyTorch's <c>site-packages/torch</c>, a libtorch zip) or its <c>lib/</c>, that libtorch is loaded by
/// absolute path — libc10, libtorch_cpu, the CUDA libraries when present, libtorch — and every native library TorchSharp
/// asks for by name resolves to it, except LibTorchSharp itself, which is the app's (patched) copy. NuGet's CPU libtorch
/// in the app folder is then never loaded beside it: exactly one libtorch is in the process.
/// </remarks>
public static class TorchRuntime
{
    /// <summary>The environment variable naming the torch folder (or its lib/) to load instead of the app's libtorch.</summary>
    public const string LibTorchVariable = "LORAHUB_LIBTORCH";

    private static readonly object gate = new();
    private static volatile bool initialized;
    private static string? libFolder;
    private static readonly Dictionary<string, string> resolved = new(StringComparer.Ordinal);

    /// <summary>The lib/ folder chosen through <see cref="LibTorchVariable"/>, or null when TorchSharp's default probing applies.</summary>
    public static string? LibTorchFolder => libFolder;

    /// <summary>
    /// Describes our CUDA kernels (compiled with NVRTC, launched through the driver) for <see cref="Describe"/>: set by the
    /// kernels code (LoRAHub.TorchExtensions.Cuda) when it loads, e.g. from a module initializer. Null: kernels not built in.
    /// </summary>
    public static Func<string>? KernelStatus { get; set; }

    /// <summary>
    /// Loads the libtorch chosen by <see cref="LibTorchVariable"/> (if set) and initialises TorchSharp, with CUDA when the
    /// loaded libtorch has it. Idempotent and thread-safe.
    /// </summary>
    /// <exception cref="InvalidOperationException">The variable names no libtorch, or TorchSharp was already initialised.</exception>
    public static void Initialize()
    {
        if (initialized) return;
        lock (gate)
        {
            if (initialized) return;
            OpenMpWaitPolicy.Apply(); // before libtorch, and libgomp with it, loads
            var requested = Environment.GetEnvironmentVariable(LibTorchVariable);
            if (!string.IsNullOrWhiteSpace(requested)) UseLibTorch(FindLibFolder(requested.Trim()));
            if (libFolder is not null && File.Exists(Path.Combine(libFolder, LibraryFile("torch_cuda"))))
                torch.InitializeDeviceType(DeviceType.CUDA);
            else
                torch.TryInitializeDeviceType(DeviceType.CUDA); // the TorchSharp CUDA packages, where referenced; false on CPU
            torch.InitializeDeviceType(DeviceType.CPU);
            initialized = true;
        }
    }

    /// <summary>The lib/ folder of a torch folder (holding libtorch_cpu), or an error naming what was looked for.</summary>
    internal static string FindLibFolder(string path)
    {
        var full = Path.GetFullPath(path);
        foreach (var candidate in new[] { Path.Combine(full, "lib"), full })
            if (File.Exists(Path.Combine(candidate, LibraryFile("torch_cpu")))) return candidate;
        throw new InvalidOperationException(
            $"{LibTorchVariable}={path}: no {LibraryFile("torch_cpu")} in {Path.Combine(full, "lib")} or {full}. " +
            "Point it at an installed PyTorch's torch folder (python -c \"import torch, os; print(os.path.dirname(torch.__file__))\"), " +
            "a libtorch folder, or their lib/; or unset it to use the libtorch beside the app.");
    }

    private static void UseLibTorch(string folder)
    {
        var assembly = typeof(torch).Assembly; // typeof runs no static constructor: nothing of TorchSharp is loaded yet
        if (LoadedLibraries.Find(LibraryFile("torch_cpu")).FirstOrDefault() is { } already && Path.GetDirectoryName(already) != folder)
            throw new InvalidOperationException($"libtorch is already loaded from {already}: call TorchRuntime.Initialize() before any TorchSharp call");
        libFolder = folder;
        // Dependencies first, so each later dlopen finds them by soname instead of searching (and finding the app's copy).
        foreach (var name in new[] { "c10", "torch_cpu", "c10_cuda", "torch_cuda", "torch" })
        {
            var file = Path.Combine(folder, LibraryFile(name));
            if (!File.Exists(file)) continue;
            NativeLibrary.Load(file);
            resolved[name] = file;
        }
        var bridge = FindLibTorchSharp(assembly) ?? throw new InvalidOperationException(
            $"LibTorchSharp's native library is not beside {assembly.Location}; the app must reference the TorchSharp package");
        resolved["LibTorchSharp"] = bridge;
        NativeLibrary.SetDllImportResolver(assembly, Resolve);
        // Our own [DllImport("LibTorchSharp")] (THSTensor_data) must bind to the same copy.
        NativeLibrary.SetDllImportResolver(typeof(TorchRuntime).Assembly, Resolve);
    }

    // TorchSharp asks for "LibTorchSharp", "torch_cpu", "torch_cuda", ... (and cuDNN names on Windows).
    private static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? searchPath)
    {
        var key = Normalise(name);
        if (resolved.TryGetValue(key, out var file)) return NativeLibrary.Load(file);
        if (libFolder is not null && File.Exists(Path.Combine(libFolder, LibraryFile(key)))) return NativeLibrary.Load(Path.Combine(libFolder, LibraryFile(key)));
        return IntPtr.Zero; // default probing
    }

    private static string Normalise(string name)
    {
        var n = Path.GetFileName(name);
        if (n.StartsWith("lib", StringComparison.Ordinal) && !n.StartsWith("LibTorchSharp", StringComparison.Ordinal)) n = n[3..];
        if (n.StartsWith("libLibTorchSharp", StringComparison.Ordinal)) n = n[3..];
        var ext = n.IndexOf(".so", StringComparison.Ordinal);
        if (ext >= 0) n = n[..ext];
        if (n.EndsWith(".dll", StringComparison.OrdinalIgnoreCase)) n = n[..^4];
        return n;
    }

    internal static string LibraryFile(string name) =>
        OperatingSystem.IsWindows() ? name + ".dll" : OperatingSystem.IsMacOS() ? $"lib{name}.dylib" : $"lib{name}.so";

    private static string? FindLibTorchSharp(Assembly assembly)
    {
        var dir = Path.GetDirectoryName(assembly.Location) ?? AppContext.BaseDirectory;
        var file = LibraryFile("LibTorchSharp");
        var rid = OperatingSystem.IsWindows() ? "win-x64" : OperatingSystem.IsMacOS() ? "osx-arm64" : "linux-x64";
        foreach (var candidate in new[] { Path.Combine(dir, file), Path.Combine(dir, "runtimes", rid, "native", file), Path.Combine(AppContext.BaseDirectory, file),
                     Path.Combine(AppContext.BaseDirectory, "runtimes", rid, "native", file) })
            if (File.Exists(candidate)) return candidate;
        return null;
    }

    /// <summary>What is really loaded: libtorch's path and version, the CUDA runtime, the devices, our kernels.</summary>
    public static TorchRuntimeDescription Describe()
    {
        Initialize();
        var libtorch = LoadedLibraries.Find(LibraryFile("torch_cpu"));
        var path = libtorch.FirstOrDefault() ?? "(not loaded)";
        string? cudaRuntime = null, cudaDriver = null;
        var devices = new List<string>();
        if (torch.cuda.is_available() && CudaRuntime.Functions is { } rt)
        {
            unsafe
            {
                int v;
                if (rt.RuntimeGetVersion(&v) == 0) cudaRuntime = CudaRuntime.FormatVersion(v);
                if (rt.DriverGetVersion(&v) == 0) cudaDriver = CudaRuntime.FormatVersion(v);
            }
            for (var d = 0; d < torch.cuda.device_count(); d++)
            {
                var (name, total, _) = torchx.cuda.get_device_properties(d);
                devices.Add($"cuda:{d} {name} ({total / (double)(1L << 30):F1} GiB)");
            }
        }
        string kernels;
        try
        {
            kernels = KernelStatus?.Invoke() ?? "not built in";
        }
        catch (Exception e)
        {
            kernels = "unavailable: " + e.Message;
        }
        return new TorchRuntimeDescription(path, LibTorchVersion(path) ?? "unknown", libtorch.Count, libFolder is null ? "app folder (TorchSharp probing)" : $"{LibTorchVariable}={libFolder}",
            cudaRuntime, CudaRuntime.RuntimePath, cudaDriver, devices, kernels, torch.get_num_threads()) { ThreadWaitPolicy = OpenMpWaitPolicy.Current };
    }

    /// <summary>libtorch's version from where it lives: torch/version.py, a libtorch zip's build-version, a NuGet package folder, or the app's deps.json.</summary>
    internal static string? LibTorchVersion(string libtorchPath)
    {
        var lib = Path.GetDirectoryName(libtorchPath);
        if (lib is null) return null;
        var parent = Path.GetDirectoryName(lib) ?? lib;
        var versionPy = Path.Combine(parent, "version.py");
        if (File.Exists(versionPy))
        {
            var m = Regex.Match(File.ReadAllText(versionPy), @"__version__\s*=\s*['""]([^'""]+)['""]");
            if (m.Success) return m.Groups[1].Value;
        }
        var buildVersion = Path.Combine(parent, "build-version");
        if (File.Exists(buildVersion)) return File.ReadAllText(buildVersion).Trim();
        // NuGet cache: .../libtorch-cpu-linux-x64/2.10.0/runtimes/linux-x64/native/libtorch_cpu.so
        var m2 = Regex.Match(libtorchPath.Replace('\\', '/'), @"/libtorch-[^/]+/(\d+\.\d+\.\d+)[^/]*/runtimes/");
        if (m2.Success) return m2.Groups[1].Value;
        return VersionFromDepsJson(Path.GetFileName(libtorchPath));
    }

    // An app's deps.json lists the package each native asset came from: "libtorch-cpu-linux-x64/2.10.0".
    private static string? VersionFromDepsJson(string fileName)
    {
        foreach (var deps in Directory.EnumerateFiles(AppContext.BaseDirectory, "*.deps.json"))
        {
            try
            {
                using var doc = JsonDocument.Parse(File.ReadAllText(deps));
                if (!doc.RootElement.TryGetProperty("targets", out var targets)) continue;
                foreach (var target in targets.EnumerateObject())
                    foreach (var package in target.Value.EnumerateObject())
                    {
                        if (!package.Name.StartsWith("libtorch", StringComparison.OrdinalIgnoreCase)) continue;
                        foreach (var kind in new[] { "native", "runtimeTargets" })
                            if (package.Value.TryGetProperty(kind, out var assets) &&
                                assets.EnumerateObject().Any(a => a.Name.EndsWith("/" + fileName, StringComparison.Ordinal)))
                                return package.Name[(package.Name.IndexOf('/') + 1)..];
                    }
            }
            catch (Exception e) when (e is JsonException or IOException)
            {
            }
        }
        return null;
    }
}

/// <summary>The libtorch and CUDA this process really runs on (from the loaded libraries, not TorchSharp's compile-time string).</summary>
public sealed record TorchRuntimeDescription(
    string LibTorchPath,
    string LibTorchVersion,
    int LibTorchCopies,
    string Source,
    string? CudaRuntimeVersion,
    string? CudaRuntimePath,
    string? CudaDriverVersion,
    IReadOnlyList<string> Devices,
    string Kernels,
    int Threads)
{
    /// <summary>OMP_WAIT_POLICY as libtorch's OpenMP threads see it (PASSIVE unless the user chose: <see cref="OpenMpWaitPolicy"/>).</summary>
    public string? ThreadWaitPolicy { get; init; }

    /// <summary>The CPU threads line's text: the count, and the wait policy where one is set.</summary>
    public string ThreadsText => ThreadWaitPolicy is null ? $"{Threads}" : $"{Threads} ({OpenMpWaitPolicy.Variable}={ThreadWaitPolicy})";

    public override string ToString()
    {
        var s = new StringBuilder();
        s.AppendLine($"libtorch:     {LibTorchVersion} ({LibTorchPath}){(LibTorchCopies > 1 ? $" WARNING: {LibTorchCopies} copies loaded" : "")}");
        s.AppendLine($"chosen by:    {Source}");
        s.AppendLine($"TorchSharp:   {typeof(torch).Assembly.GetName().Version} (built for libtorch {torch.__version__})");
        s.AppendLine($"CUDA:         {(CudaRuntimeVersion is null ? "not available" : $"runtime {CudaRuntimeVersion} ({CudaRuntimePath}), driver {CudaDriverVersion}")}");
        foreach (var d in Devices) s.AppendLine($"device:       {d}");
        s.AppendLine($"CPU threads:  {ThreadsText}");
        s.Append($"our kernels:  {Kernels}");
        return s.ToString();
    }
}
