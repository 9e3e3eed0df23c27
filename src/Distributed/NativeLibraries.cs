using System.Reflection;
using System.Runtime.InteropServices;

namespace LoRAHub.Distributed;

/// <summary>
/// Binds the collective engines' C libraries at run time: "mpi" to MPICH's libmpich.so.12 (or LORAHUB_MPI), "nccl" to
/// the libnccl.so.2 found by <see cref="Nccl.NcclLocator"/>. Nothing is loaded until a backend is first used.
/// </summary>
internal static class NativeLibraries
{
    public const string Mpi = "lorahub-mpi";
    public const string Nccl = "lorahub-nccl";
    public const string MpiVariable = "LORAHUB_MPI";

    private static int registered;

    public static void Register()
    {
        if (Interlocked.Exchange(ref registered, 1) == 1) return;
        NativeLibrary.SetDllImportResolver(typeof(NativeLibraries).Assembly, Resolve);
    }

    private static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? path)
    {
        if (name == Mpi) return LoadMpi();
        if (name == Nccl) return LoRAHub.Distributed.Nccl.NcclLocator.Load();
        return IntPtr.Zero;
    }

    private static readonly Lazy<IntPtr> mpi = new(() =>
    {
        var env = System.Environment.GetEnvironmentVariable(MpiVariable);
        var candidates = new List<string>();
        if (!string.IsNullOrWhiteSpace(env)) candidates.Add(env);
        candidates.AddRange(["libmpich.so.12", "libmpi.so.12", "libmpich.so"]);
        foreach (var c in candidates)
            if (NativeLibrary.TryLoad(c, out var handle)) return handle;
        throw new DistributedException(
            "the CPU (MPI) backend needs MPICH: install it (Debian/Ubuntu: apt-get install -y mpich libmpich-dev; setup.sh does) " +
            $"or point {MpiVariable} at libmpich.so.12. Tried: {string.Join(", ", candidates)}. Windows has no MPICH build here: train on one process.");
    });

    private static IntPtr LoadMpi() => mpi.Value;
}
