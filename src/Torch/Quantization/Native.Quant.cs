using System.Runtime.InteropServices;

namespace LoRAHub.Torch;

// P/Invoke declarations of the quantization (native/src/lh_quant.cpp) and unified-memory (native/src/lh_paged.cpp) entry
// points, kept apart from Native.cs so that each area adds its own.
internal static unsafe partial class Native
{
    [LibraryImport(Lib)] internal static partial IntPtr lh_dequantize_4bit(IntPtr packed, IntPtr code, IntPtr absmax, IntPtr nestedCodes,
        IntPtr nestedScales, IntPtr nestedCode, double offset, long blocksize, long numel, int dtype, int impl);
    [LibraryImport(Lib)] internal static partial IntPtr lh_fourbit_block_absmax(IntPtr packed, IntPtr code, IntPtr absmax, IntPtr nestedCodes,
        IntPtr nestedScales, IntPtr nestedCode, double offset, long blocksize, long numel);
    [LibraryImport(Lib)] internal static partial int lh_quant_has_cuda_kernels();
    [LibraryImport(Lib)] internal static partial IntPtr lh_linear_4bit(IntPtr x, IntPtr packed, IntPtr code, IntPtr absmax, IntPtr nestedCodes,
        IntPtr nestedScales, IntPtr nestedCode, double offset, long blocksize, long outFeatures, long inFeatures);

    [LibraryImport(Lib)] internal static partial IntPtr lh_managed_zeros(long* shape, int ndim, int dtype, int device, long headroomBytes);
    [LibraryImport(Lib)] internal static partial int lh_managed_prefetch(IntPtr t, int toHost);
    [LibraryImport(Lib)] internal static partial int lh_managed_is_managed(IntPtr t);
    [LibraryImport(Lib)] internal static partial long lh_managed_bytes();
    [LibraryImport(Lib)] internal static partial long lh_managed_count();
}
