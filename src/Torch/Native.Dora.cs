using System.Runtime.InteropServices;

namespace LoRAHub.Torch;

// P/Invoke declarations for native/src/lh_dora.cpp (DoRA's weight norm and fused output op) and the tensor version
// counter of lh_core.cpp.
internal static unsafe partial class Native
{
    [LibraryImport(Lib), SuppressGCTransition] internal static partial long lh_dora_launch_count();
    [LibraryImport(Lib)] internal static partial IntPtr lh_dora_output(IntPtr t, IntPtr m, IntPtr norm, IntPtr bias, int fused);
    [LibraryImport(Lib)] internal static partial IntPtr lh_dora_weight_norm(IntPtr w0, IntPtr baseNormsSquared, IntPtr a, IntPtr b, double scaling);
    [LibraryImport(Lib), SuppressGCTransition] internal static partial long lh_tensor_version(IntPtr t);
}

public sealed partial class Tensor
{
    /// <summary>
    /// The version counter (PyTorch's tensor._version): bumped by every in-place write to the tensor or a view of it,
    /// optimizer steps included. Caches of values derived from a tensor compare it to tell when the tensor changed.
    /// </summary>
    public long _version => Native.lh_tensor_version(Handle);
}
