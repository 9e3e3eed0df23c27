using System.Text;

namespace LoRAHub.Torch;

public static unsafe partial class torch
{
    /// <summary>CUDA queries and the caching allocator's statistics (torch.cuda.*).</summary>
    public static class cuda
    {
        /// <summary>True when the shim was built against a CUDA libtorch and a GPU is visible.</summary>
        public static bool is_available() => Native.lh_cuda_is_available() != 0;
        public static int device_count() => Native.lh_cuda_device_count();
        public static bool built_with_cuda => Native.lh_has_cuda_build() != 0;

        public static void synchronize(int device = 0) => Native.Check(Native.lh_cuda_synchronize(device));

        private static long Stat(int device, int which)
        {
            long v;
            Native.Check(Native.lh_cuda_memory_stat(device, which, &v));
            return v;
        }

        public static long memory_allocated(int device = 0) => Stat(device, 0);
        public static long max_memory_allocated(int device = 0) => Stat(device, 1);
        public static long memory_reserved(int device = 0) => Stat(device, 2);
        public static long max_memory_reserved(int device = 0) => Stat(device, 3);
        public static void reset_peak_memory_stats(int device = 0) => Native.Check(Native.lh_cuda_reset_peak_memory_stats(device));
        public static void empty_cache() => Native.Check(Native.lh_cuda_empty_cache());

        public static (string Name, long TotalBytes, long FreeBytes) get_device_properties(int device = 0)
        {
            var name = new byte[256];
            long total, free;
            fixed (byte* n = name) Native.Check(Native.lh_cuda_device_info(device, n, name.Length, &total, &free));
            var len = Array.IndexOf(name, (byte)0);
            return (Encoding.UTF8.GetString(name, 0, len < 0 ? name.Length : len), total, free);
        }

        public static Tensor get_rng_state(int device = 0) => new(Native.lh_cuda_rng_get_state(device));
        public static void set_rng_state(Tensor state, int device = 0) => Native.Check(Native.lh_cuda_rng_set_state(device, state.Handle));
    }
}
