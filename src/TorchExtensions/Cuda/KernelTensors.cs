using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>Tensor facts kernel launchers need: element-type codes and names, alignment, device, raw pointers.</summary>
public static class KernelTensors
{
    /// <summary>True for the element types the kernels take (fp32, fp16, bf16).</summary>
    public static bool Supported(ScalarType t) => t is ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16;

    /// <summary>The kernels' name suffix of an element type: f32, f16, bf16.</summary>
    public static string Suffix(ScalarType t) => t switch
    {
        ScalarType.Float32 => "f32",
        ScalarType.Float16 => "f16",
        ScalarType.BFloat16 => "bf16",
        _ => throw new ArgumentException($"LoRAHub's kernels take float32, float16 or bfloat16 tensors, not {t}"),
    };

    /// <summary>LH_F32 / LH_F16 / LH_BF16 of lh_common.cuh.</summary>
    public static int Code(ScalarType t) => t switch
    {
        ScalarType.Float32 => 0,
        ScalarType.Float16 => 1,
        ScalarType.BFloat16 => 2,
        _ => throw new ArgumentException($"LoRAHub's kernels take float32, float16 or bfloat16 tensors, not {t}"),
    };

    /// <summary>Elements per 16-byte access.</summary>
    public static int VectorWidth(ScalarType t) => t == ScalarType.Float32 ? 4 : 8;

    /// <summary>The address of the first element (view offset included).</summary>
    public static IntPtr Ptr(Tensor t) => torchx.data_ptr(t);

    public static bool Aligned16(IntPtr p) => ((long)p & 15) == 0;

    /// <summary>
    /// True when <paramref name="b"/> starts where <paramref name="a"/>'s columns end, in the same rows of one row-major
    /// buffer (2-D, same dtype and device, unit column strides, one row stride): column blocks side by side.
    /// </summary>
    public static bool AdjacentColumns(Tensor a, Tensor b) =>
        a.dim() == 2 && b.dim() == 2 && a.dtype == b.dtype && a.size(0) == b.size(0) && a.stride(1) == 1 && b.stride(1) == 1
        && a.stride(0) == b.stride(0) && torchx.same_device(a, b)
        && torchx.data_ptr(b) == torchx.data_ptr(a) + a.size(1) * a.element_size();

    /// <summary>The CUDA device index of a tensor.</summary>
    public static int DeviceIndex(Tensor t) => Math.Max(0, t.device_index);

    /// <summary>True when the tensor is a CUDA tensor of a supported type and the kernels can run.</summary>
    public static bool Usable(Tensor t) => t.device_type == DeviceType.CUDA && Supported(t.dtype) && CudaKernels.Available;

    /// <summary>
    /// True when the tensor's elements fill its memory exactly once in some dimension order (a permutation of a
    /// contiguous layout, e.g. a transposed view of a contiguous tensor): empty_like then gives the same strides.
    /// </summary>
    public static bool IsNonOverlappingAndDense(Tensor t)
    {
        if (t.numel() == 0) return true;
        var sizes = t.shape;
        var strides = t.stride();
        var dims = Enumerable.Range(0, sizes.Length).Where(d => sizes[d] != 1).OrderBy(d => strides[d]).ToArray();
        long expected = 1;
        foreach (var d in dims)
        {
            if (strides[d] != expected) return false;
            expected *= sizes[d];
        }
        return true;
    }

    /// <summary>True when both tensors are on the same device (TorchSharp's Device compares by reference).</summary>
    public static bool SameDevice(Tensor a, Tensor b) => torchx.same_device(a, b);

    /// <summary>"[2, 3]".</summary>
    public static string Shape(Tensor t) => "[" + string.Join(", ", t.shape) + "]";
}
