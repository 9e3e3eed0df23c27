using System.Runtime.InteropServices;

namespace LoRAHub.Torch;

// P/Invoke declarations for native/src/lh_fused_ops.cpp (fused RMSNorm, SwiGLU, RoPE) and lh_nn.cpp's GQA attention.
internal static unsafe partial class Native
{
    [LibraryImport(Lib)] internal static partial int lh_fused_kernels_available();
    [LibraryImport(Lib), SuppressGCTransition] internal static partial long lh_fused_launch_count();
    [LibraryImport(Lib)] internal static partial IntPtr lh_fused_rms_norm(IntPtr x, IntPtr w, double eps, int fused);
    [LibraryImport(Lib)] internal static partial IntPtr lh_fused_swiglu(IntPtr gate, IntPtr up, int fused);
    [LibraryImport(Lib)] internal static partial IntPtr lh_fused_rope(IntPtr x, IntPtr cos, IntPtr sin, int fused);
    [LibraryImport(Lib)] internal static partial IntPtr lh_sdpa_gqa(IntPtr q, IntPtr k, IntPtr v, IntPtr mask, double dropoutP, int isCausal, double scale, int hasScale);
}
