using System.Runtime.InteropServices;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// libtorch's CPU build runs its parallel regions on GNU OpenMP, whose idle threads spin before they sleep. When another
/// busy process shares the cores (a build, a second run, test assemblies side by side), spinning threads take the CPU
/// from the one thread a region waits for, and a small model's step became 30–40× slower (2 cores, one competitor);
/// sleeping at once costs little when the machine is idle. So, unless the user chose a policy, the process asks for
/// <c>OMP_WAIT_POLICY=PASSIVE</c> before libtorch (and with it libgomp, which reads the variable once, as it loads) is
/// loaded.
/// </summary>
internal static class OpenMpWaitPolicy
{
    public const string Variable = "OMP_WAIT_POLICY";

    /// <summary>Sets the variable in the native environment (what libgomp reads), unless it is already set; Linux only.</summary>
    public static void Apply()
    {
        if (!OperatingSystem.IsLinux() || !string.IsNullOrEmpty(Environment.GetEnvironmentVariable(Variable))) return;
        // .NET's Environment.SetEnvironmentVariable changes only the managed copy; libgomp calls getenv.
        try
        {
            if (setenv(Variable, "PASSIVE", 0) == 0) Environment.SetEnvironmentVariable(Variable, "PASSIVE");
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            // A C library we cannot call: threads keep libgomp's default, which only costs speed beside other work.
        }
    }

    /// <summary>The policy libgomp sees (the native environment's value on Linux), or null when none is set.</summary>
    public static string? Current
    {
        get
        {
            if (!OperatingSystem.IsLinux()) return Environment.GetEnvironmentVariable(Variable);
            try
            {
                return Marshal.PtrToStringUTF8(getenv(Variable));
            }
            catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
            {
                return Environment.GetEnvironmentVariable(Variable);
            }
        }
    }

    [DllImport("libc")]
    private static extern IntPtr getenv([MarshalAs(UnmanagedType.LPUTF8Str)] string name);

    [DllImport("libc", SetLastError = true)]
    private static extern int setenv([MarshalAs(UnmanagedType.LPUTF8Str)] string name, [MarshalAs(UnmanagedType.LPUTF8Str)] string value, int overwrite);
}
