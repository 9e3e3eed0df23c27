using System.Globalization;
using LoRAHub.Distributed.Mpi;
using LoRAHub.Distributed.Nccl;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Distributed;

/// <summary>
/// The process-wide default group, as torch.distributed: <see cref="init_process_group"/> joins the ranks named by the
/// environment (torchrun's variables, or PMI's under mpiexec) once per process; CUDA devices get NCCL, the CPU gets MPI
/// (LORAHUB_DIST_BACKEND=nccl|mpi overrides). LORAHUB_DIST_TIMEOUT (seconds, default 300) bounds every collective.
/// </summary>
public static class distributed
{
    public const string BackendVariable = "LORAHUB_DIST_BACKEND";
    public const string TimeoutVariable = "LORAHUB_DIST_TIMEOUT";
    private static readonly object gate = new();
    private static ProcessGroup? group;

    /// <summary>True when the environment describes more than one rank (WORLD_SIZE or PMI_SIZE above 1).</summary>
    public static bool is_distributed_environment() => DistributedEnvironment.FromEnvironment().IsDistributed;

    public static bool is_initialized() => group != null;

    /// <summary>The default group, or null when none was made.</summary>
    public static ProcessGroup? default_group => group;

    public static TimeSpan DefaultTimeout()
    {
        var text = Environment.GetEnvironmentVariable(TimeoutVariable);
        if (string.IsNullOrWhiteSpace(text)) return TimeSpan.FromSeconds(300);
        if (!double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out var s) || s <= 0)
            throw new DistributedException($"{TimeoutVariable}='{text}' is not a positive number of seconds");
        return TimeSpan.FromSeconds(s);
    }

    /// <summary>
    /// Joins the ranks (once per process; later calls return the same group). For CUDA, <paramref name="device"/> is this
    /// rank's GPU (cuda:LOCAL_RANK under the launcher).
    /// </summary>
    public static ProcessGroup init_process_group(Device device, string? backend = null, TimeSpan? timeout = null)
    {
        lock (gate)
        {
            if (group != null) return group;
            var env = DistributedEnvironment.FromEnvironment();
            backend ??= Environment.GetEnvironmentVariable(BackendVariable) is { Length: > 0 } b ? b : device.type == DeviceType.CUDA ? "nccl" : "mpi";
            var t = timeout ?? DefaultTimeout();
            group = backend.ToLowerInvariant() switch
            {
                "nccl" => NcclProcessGroup.Create(env, device.type == DeviceType.CUDA && device.index >= 0 ? device.index : env.LocalRank, t),
                "mpi" => MpiProcessGroup.Create(env, t),
                _ => throw new DistributedException($"unknown backend '{backend}': use nccl (CUDA tensors) or mpi (CPU tensors)"),
            };
            return group;
        }
    }

    /// <summary>
    /// Makes cuda:<paramref name="index"/> this thread's current CUDA device (torch.cuda.set_device): a rank that works on
    /// cuda:LOCAL_RANK then creates no context on another rank's GPU. Call after libtorch's CUDA is loaded.
    /// </summary>
    public static void set_device(int index) => CudaEvents.SetDevice(index);

    /// <summary>Ends the default group (MPI cannot be started again in this process).</summary>
    public static void destroy_process_group()
    {
        lock (gate)
        {
            group?.Dispose();
            group = null;
        }
    }
}
