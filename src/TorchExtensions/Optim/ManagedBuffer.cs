using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Optim;

/// <summary>
/// A block of CUDA managed (unified) memory holding a dense array of <see cref="dtype"/> values, made by
/// <see cref="UnifiedMemory.zeros"/>. Not a tensor: TorchSharp cannot wrap a foreign device pointer, so kernels use it
/// through <see cref="Pointer"/>, and <see cref="to_tensor"/> / <see cref="copy_"/> move values to and from tensors.
/// Freed (cuMemFree) by <see cref="Dispose"/>.
/// </summary>
public sealed unsafe class ManagedBuffer : IDisposable
{
    internal ManagedBuffer(ulong pointer, long[] shape, ScalarType dtype, int device, long bytes)
    {
        address = pointer;
        this.shape = shape;
        this.dtype = dtype;
        Device = device;
        Bytes = bytes;
    }

    private ulong address;

    /// <summary>The device address (valid on the GPU and, for managed memory, on the host).</summary>
    public IntPtr Pointer => address != 0 ? (IntPtr)(long)address : throw new ObjectDisposedException(nameof(ManagedBuffer));

    public long[] shape { get; }
    public ScalarType dtype { get; }

    /// <summary>The CUDA device index the memory was allocated for (and is prefetched to).</summary>
    public int Device { get; }

    public long Bytes { get; }
    public long numel() => shape.Aggregate(1L, (a, b) => a * b);
    public bool IsDisposed => address == 0;

    /// <summary>A new tensor on the buffer's device with a copy of its values (enqueued on the legacy default stream).</summary>
    public Tensor to_tensor()
    {
        var t = empty(shape, dtype, new torch.Device(DeviceType.CUDA, Device));
        if (Bytes == 0) return t;
        using var _ = CudaDriver.OnDevice(Device);
        CudaDriver.Check(CudaDriver.cuMemcpyAsync((ulong)(long)KernelTensors.Ptr(t), (ulong)(long)Pointer, (nuint)Bytes, CudaDriver.LegacyStream),
            "cuMemcpyAsync (managed buffer to tensor)");
        return t;
    }

    /// <summary>Copies a tensor's values into the buffer (same number of elements; converted to the buffer's dtype on its device).</summary>
    public void copy_(Tensor source)
    {
        if (source.numel() != numel())
            throw new ArgumentException($"cannot copy {source.numel()} values into a managed buffer of {numel()}");
        if (Bytes == 0) return;
        using var scope = NewDisposeScope();
        var src = source.to(dtype, new torch.Device(DeviceType.CUDA, Device)).contiguous();
        using var _ = CudaDriver.OnDevice(Device);
        CudaDriver.Check(CudaDriver.cuMemcpyAsync((ulong)(long)Pointer, (ulong)(long)KernelTensors.Ptr(src), (nuint)Bytes, CudaDriver.LegacyStream),
            "cuMemcpyAsync (tensor to managed buffer)");
        // src may be a temporary freed when this scope ends: the caching allocator reuses it only for work enqueued
        // after the copy on the same stream, so the copy still reads the right values.
    }

    public void Dispose()
    {
        var p = Interlocked.Exchange(ref address, 0);
        if (p == 0) return;
        using (CudaDriver.OnDevice(Device)) CudaDriver.cuMemFree(p); // waits for work that still uses it
        UnifiedMemory.Released(Bytes);
    }
}
