using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// What TorchSharp 0.107 lacks, with PyTorch's names, mirroring <see cref="torch"/>: <c>torchx.nn.functional.rms_norm</c>,
/// <c>torchx.utils.checkpoint</c>, <c>torchx.cuda.max_memory_allocated</c>, <c>torchx.load_safetensors</c>, ...
/// Several files add members (partial class).
/// </summary>
public static partial class torchx
{
    /// <summary>
    /// The address of the first element of <paramref name="tensor"/> (view offsets included), for kernels launched on raw
    /// pointers. Through LibTorchSharp's exported THSTensor_data; the tensor must stay alive while the pointer is used.
    /// </summary>
    public static IntPtr data_ptr(Tensor tensor)
    {
        var p = THSTensor_data(tensor.Handle);
        if (p == IntPtr.Zero && tensor.numel() > 0) torch.CheckForErrors();
        return p;
    }

    [DllImport("LibTorchSharp")]
    private static extern IntPtr THSTensor_data(IntPtr handle);

    /// <summary>
    /// True when <paramref name="tensor"/> lives on <paramref name="device"/> ("cuda" meaning device 0). TorchSharp's
    /// <see cref="Device"/> compares by reference: <c>t.device == device</c> is false for the same device.
    /// </summary>
    public static bool is_on(Tensor tensor, Device device) =>
        tensor.device_type == device.type && (device.type == DeviceType.CPU || tensor.device_index == Math.Max(device.index, 0));

    /// <summary>True when the two tensors live on the same device (see <see cref="is_on"/>).</summary>
    public static bool same_device(Tensor a, Tensor b) => a.device_type == b.device_type && a.device_index == b.device_index;

    /// <summary>
    /// Tensors alive in managed code (created and not yet disposed or finalized), for leak checks: TorchSharp's
    /// <see cref="Tensor.TotalCount"/>. Tensors that live only inside libtorch (autograd's saved values) are not counted.
    /// </summary>
    public static long LiveTensorCount => Tensor.TotalCount;

    /// <summary>Runs <paramref name="f"/>, turning libtorch's ExternalException into a typed <see cref="TorchException"/>.</summary>
    public static T Guard<T>(Func<T> f)
    {
        try
        {
            return f();
        }
        catch (ExternalException e)
        {
            throw TorchErrors.Translate(e);
        }
    }

    /// <summary>Runs <paramref name="f"/>, turning libtorch's ExternalException into a typed <see cref="TorchException"/>.</summary>
    public static void Guard(Action f)
    {
        try
        {
            f();
        }
        catch (ExternalException e)
        {
            throw TorchErrors.Translate(e);
        }
    }

    /// <summary>The CPU generator's state (torch.get_rng_state).</summary>
    public static Tensor get_rng_state() => torch.random.get_rng_state();

    /// <summary>Restores the CPU generator's state (torch.set_rng_state).</summary>
    public static void set_rng_state(Tensor state) => torch.random.set_rng_state(state);

    public static partial class nn
    {
        public static partial class functional
        {
        }

        public static partial class utils
        {
        }
    }
}
