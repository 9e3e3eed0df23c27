using System.Text.RegularExpressions;

namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>
/// Programmatic dependent launch (sm_90+): kernels of programs built with <c>dependentLaunch</c>
/// (<see cref="CudaProgram"/>) are launched with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, so the GPU may
/// schedule a kernel's blocks while the kernel ahead of it on the stream finishes, instead of after its completion and
/// a fresh launch (~1–2 µs between two dependent kernels on an H200, ~440 of our launches a llama-1b LoRA step). Each
/// such kernel first calls lh_grid_dependency_sync() (lh_common.cuh), which waits until the kernel ahead has completed
/// and its writes are visible, then lets the next kernel be scheduled early the same way: the results are those of
/// plain launches. A program that opts in is checked when built (<see cref="Check"/>): a kernel that does not start with
/// that call would read its inputs too early, so it is refused. LORAHUB_DEPENDENT_LAUNCH=0 (or <see cref="Enabled"/>)
/// launches every kernel plainly; so do GPUs below compute capability 9.0 and drivers without cuLaunchKernelEx.
/// </summary>
public static class DependentLaunch
{
    /// <summary>The call every kernel of a dependent-launch program makes first (lh_common.cuh).</summary>
    public const string SyncCall = "lh_grid_dependency_sync();";

    /// <summary>Whether kernels of programs that opted in take dependent launches (default on; LORAHUB_DEPENDENT_LAUNCH=0: off).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_DEPENDENT_LAUNCH")?.Trim() != "0";

    private static long launches;
    private static volatile string? refused;

    /// <summary>Dependent launches so far (tests: proof that the path ran).</summary>
    public static long Launches => Interlocked.Read(ref launches);

    /// <summary>Why the driver refused a dependent launch that a plain launch then took (null: none refused); later launches are plain.</summary>
    public static string? Refused => refused;

    /// <summary>One line for logs and benchmarks.</summary>
    public static string Report =>
        !Enabled ? "off (LORAHUB_DEPENDENT_LAUNCH=0)"
        : refused is { } why ? $"off after the driver refused one ({why}); {Launches} before"
        : $"{Launches} launches";

    // Whether a kernel of a program that opted in, on a device of compute capability 9.0+ (CudaProgram.Function), is
    // launched so now.
    internal static unsafe bool On => Enabled && refused is null && CudaDriver.cuLaunchKernelEx != null;

    internal static void Count() => Interlocked.Increment(ref launches);

    // A dependent launch failed where a plain one of the same kernel worked: the driver (or stream) does not take them.
    internal static void Refuse(int status)
    {
        if (refused is not null) return;
        refused = CudaDriver.ErrorText(status);
        Console.Error.WriteLine($"LoRAHub: the CUDA driver refused a programmatic dependent launch ({refused}); kernels are launched plainly from now on");
    }

    private static readonly Regex Global = new(@"__global__\s+void\b", RegexOptions.Compiled);

    // At a `__global__ void`: `[__launch_bounds__(...)] name(`, the name with any macro-pasted pieces.
    private static readonly Regex Name = new(@"\G__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?([\w#]+)\s*\(", RegexOptions.Compiled);

    /// <summary>
    /// Throws an <see cref="ArgumentException"/> naming the first kernel of <paramref name="source"/> (program
    /// <paramref name="program"/>) whose body does not start with <see cref="SyncCall"/>. Kernels written in macros
    /// are checked in the macro's text (line continuations are skipped).
    /// </summary>
    public static void Check(string program, string source)
    {
        foreach (Match g in Global.Matches(source))
        {
            var m = Name.Match(source, g.Index);
            var name = m.Success ? m.Groups[1].Value : "(unnamed)";
            var open = m.Success ? source.IndexOf('{', m.Index + m.Length) : -1;
            var body = open < 0 ? "" : source.AsSpan(open + 1).TrimStart(" \t\r\n\\").ToString();
            if (!body.StartsWith(SyncCall, StringComparison.Ordinal))
                throw new ArgumentException(
                    $"{program}: kernel {name} does not start with {SyncCall}; a program built with dependentLaunch must call it " +
                    "first in every kernel (it could otherwise read its inputs before the kernel ahead of it has written them), or be built without",
                    nameof(source));
        }
    }
}
