using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    /// <summary>
    /// CUDA memory statistics and queries TorchSharp lacks (torch.cuda.*), read through the CUDA runtime libtorch loaded.
    /// </summary>
    /// <remarks>
    /// libtorch's caching-allocator counters are C++ only. So these figures come from the CUDA driver:
    /// <list type="bullet">
    /// <item>Exact, as PyTorch reports them, when the process runs under
    /// <c>PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync</c>: libtorch then allocates from the device's default memory
    /// pool, and memory_allocated / max_memory_allocated / memory_reserved / max_memory_reserved are the pool's
    /// cudaMemPoolAttrUsedMemCurrent / UsedMemHigh / ReservedMemCurrent / ReservedMemHigh (what PyTorch's own
    /// cudaMallocAsync backend returns); reset_peak_memory_stats resets the two high-water marks; empty_cache trims the
    /// pool. Run the peer under the same setting so the figures compare like with like.</item>
    /// <item>Under the default caching allocator (no such setting), all four report the device's used memory,
    /// cudaMemGetInfo's total − free: the allocator's reserved memory plus the CUDA context (and any other process on the
    /// device). That allocator never gives memory back except in empty_cache, so the value now is also the peak since
    /// the last empty_cache: an upper bound of PyTorch's max_memory_reserved, not max_memory_allocated.
    /// <see cref="memory_stats_exact"/> says which applies; empty_cache then only synchronizes.</item>
    /// </list>
    /// On a process without CUDA the statistics are 0, as in PyTorch. get_rng_state/set_rng_state are not offered: the
    /// default CUDA generator is reachable only through libtorch's C++ API (TorchSharp can seed it, which
    /// <see cref="utils.checkpoint"/> uses instead).
    /// </remarks>
    public static unsafe partial class cuda
    {
        /// <summary>True when libtorch allocates through cudaMallocAsync, so the statistics are exact (see the class remarks).</summary>
        public static bool memory_stats_exact => UsesCudaMallocAsync;

        internal static bool UsesCudaMallocAsync { get; } =
            (Environment.GetEnvironmentVariable("PYTORCH_CUDA_ALLOC_CONF") + "," + Environment.GetEnvironmentVariable("PYTORCH_ALLOC_CONF"))
                .Contains("backend:cudaMallocAsync", StringComparison.Ordinal);

        public static long memory_allocated(int device = 0) => Stat(device, CudaRuntime.cudaMemPoolAttrUsedMemCurrent);
        public static long max_memory_allocated(int device = 0) => Stat(device, CudaRuntime.cudaMemPoolAttrUsedMemHigh);
        public static long memory_reserved(int device = 0) => Stat(device, CudaRuntime.cudaMemPoolAttrReservedMemCurrent);
        public static long max_memory_reserved(int device = 0) => Stat(device, CudaRuntime.cudaMemPoolAttrReservedMemHigh);

        /// <summary>Starts the peak figures afresh (cudaMallocAsync: resets the pool's high-water marks to the current use).</summary>
        public static void reset_peak_memory_stats(int device = 0)
        {
            if (Runtime() is not { } rt || !UsesCudaMallocAsync) return;
            rt.ResetPoolHigh(device, CudaRuntime.cudaMemPoolAttrUsedMemHigh);
            rt.ResetPoolHigh(device, CudaRuntime.cudaMemPoolAttrReservedMemHigh);
        }

        /// <summary>Returns unused cached memory to the device (cudaMallocAsync: cudaMemPoolTrimTo(pool, 0) after a synchronize).</summary>
        public static void empty_cache()
        {
            if (Runtime() is not { } rt) return;
            var status = rt.DeviceSynchronize();
            rt.Check(status, "cudaDeviceSynchronize");
            if (!UsesCudaMallocAsync) return;
            int count;
            rt.Check(rt.GetDeviceCount(&count), "cudaGetDeviceCount");
            for (var d = 0; d < count; d++) rt.TrimPool(d);
        }

        /// <summary>Waits for all work on the device (TorchSharp's torch.cuda.synchronize).</summary>
        public static void synchronize(int device = 0) => torch.cuda.synchronize(new Device(DeviceType.CUDA, device));

        /// <summary>The device's name, total and free memory in bytes.</summary>
        public static (string Name, long TotalBytes, long FreeBytes) get_device_properties(int device = 0)
        {
            var rt = Runtime() ?? throw new InvalidOperationException("CUDA is not available: the loaded libtorch has no CUDA runtime");
            var (free, total) = MemInfo(rt, device);
            return (rt.DeviceName(device), total, free);
        }

        private static (long free, long total) MemInfo(CudaRuntime.Api rt, int device) => rt.OnDevice(device, () =>
        {
            nuint free, total;
            rt.Check(rt.MemGetInfo(&free, &total), "cudaMemGetInfo");
            return ((long)free, (long)total);
        });

        private static long Stat(int device, int poolAttribute)
        {
            if (Runtime() is not { } rt) return 0;
            if (UsesCudaMallocAsync) return (long)rt.PoolAttribute(device, poolAttribute);
            var (free, total) = MemInfo(rt, device);
            return total - free;
        }

        private static CudaRuntime.Api? Runtime() => torch.cuda.is_available() ? CudaRuntime.Functions : null;
    }
}
