using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Optim;

/// <summary>
/// CUDA unified (managed) memory for paged optimizer state, as bitsandbytes' paged optimizers use it: under GPU memory
/// pressure the driver pages it out to host memory instead of the run failing, and it is prefetched back before use.
/// Allocation goes through the CUDA driver (cuMemAllocManaged), never beyond the GPU's free memory minus a headroom:
/// asking for more managed memory than the card has free can stall the whole GPU, so such a request fails with
/// <see cref="OutOfMemoryTorchException"/> instead.
/// </summary>
public static unsafe class UnifiedMemory
{
    private static long bytes;
    private static long count;

    /// <summary>
    /// Zero-filled managed memory for <paramref name="shape"/> values of <paramref name="dtype"/> on a CUDA device. Throws
    /// OutOfMemoryTorchException, allocating nothing, when its size plus <paramref name="headroom_bytes"/> exceeds the
    /// GPU's free memory (after returning libtorch's cached memory where its allocator allows); ArgumentException for a
    /// CPU device.
    /// </summary>
    public static ManagedBuffer zeros(long[] shape, ScalarType dtype, Device device, long headroom_bytes = PagedAdamW.DefaultHeadroomBytes)
    {
        if (device.type != DeviceType.CUDA) throw new ArgumentException($"unified memory is CUDA memory; got device {device}", nameof(device));
        if (headroom_bytes < 0) throw new ArgumentOutOfRangeException(nameof(headroom_bytes), "must be non-negative");
        if (shape.Any(s => s < 0)) throw new ArgumentException("negative dimension", nameof(shape));
        if (CudaDriver.EnsureLoaded() is { } reason) throw new TorchException(TorchErrorKind.Generic, "unified memory needs the CUDA driver: " + reason);
        var index = Math.Max(0, device.index);
        var size = shape.Aggregate(1L, (a, b) => a * b) * ElementSize(dtype);
        using var _ = CudaDriver.OnDevice(index);
        if (size > 0)
        {
            var free = FreeBytes();
            if (size + headroom_bytes > free)
            {
                torchx.cuda.empty_cache();
                free = FreeBytes();
            }
            if (size + headroom_bytes > free)
            {
                static string Mib(long b) => (b >> 20).ToString();
                throw new OutOfMemoryTorchException(
                    $"paged optimizer state: {Mib(size)} MiB of unified memory requested but cuda:{index} has only {Mib(free)} MiB free " +
                    $"({Mib(headroom_bytes)} MiB kept as headroom); unified memory is never requested beyond the GPU's free memory. " +
                    "Free GPU memory (smaller batch, activation checkpointing) or turn the paged optimizer off (paged_optimizer = false)");
            }
        }
        ulong ptr = 0;
        if (size > 0)
        {
            CudaDriver.Check(CudaDriver.cuMemAllocManaged(&ptr, (nuint)size, CudaDriver.MemAttachGlobal), "cuMemAllocManaged");
            try
            {
                // First touch on the GPU: the pages are created there (no host round trip), then zeroed in stream order.
                if (ConcurrentAccess(index)) Prefetch(ptr, size, index, toHost: false);
                CudaDriver.Check(CudaDriver.cuMemsetD8Async(ptr, 0, (nuint)size, CudaDriver.LegacyStream), "cuMemsetD8Async");
            }
            catch
            {
                CudaDriver.cuMemFree(ptr);
                throw;
            }
        }
        Interlocked.Add(ref bytes, size);
        Interlocked.Increment(ref count);
        return new ManagedBuffer(ptr, shape.ToArray(), dtype, index, size);
    }

    /// <summary>
    /// Moves a buffer's pages to its GPU (or to host memory), asynchronously on the legacy default stream. A no-op where
    /// the device cannot prefetch (bitsandbytes' rule) or the buffer is empty.
    /// </summary>
    public static void prefetch(ManagedBuffer buffer, bool to_host = false)
    {
        if (buffer.Bytes == 0 || buffer.IsDisposed) return;
        using var _ = CudaDriver.OnDevice(buffer.Device);
        if (!ConcurrentAccess(buffer.Device)) return;
        Prefetch((ulong)(long)buffer.Pointer, buffer.Bytes, buffer.Device, to_host);
    }

    /// <summary>True when the buffer's memory is CUDA managed memory (as the driver reports it).</summary>
    public static bool is_managed(ManagedBuffer buffer) => !buffer.IsDisposed && buffer.Bytes > 0 && IsManaged((ulong)(long)buffer.Pointer);

    /// <summary>True when a tensor's memory is CUDA managed memory (libtorch's allocators never make such tensors).</summary>
    public static bool is_managed(Tensor t) =>
        t.device_type == DeviceType.CUDA && t.numel() > 0 && CudaDriver.EnsureLoaded() is null && IsManaged((ulong)(long)torchx.data_ptr(t));

    /// <summary>Bytes of unified memory currently allocated through <see cref="zeros"/>.</summary>
    public static long allocated_bytes => Interlocked.Read(ref bytes);

    /// <summary>Number of live unified-memory allocations made through <see cref="zeros"/>.</summary>
    public static long allocation_count => Interlocked.Read(ref count);

    internal static void Released(long size)
    {
        Interlocked.Add(ref bytes, -size);
        Interlocked.Decrement(ref count);
    }

    private static bool IsManaged(ulong ptr)
    {
        uint managed = 0;
        return CudaDriver.cuPointerGetAttribute(&managed, CudaDriver.PointerAttrIsManaged, ptr) == CudaDriver.Success && managed != 0;
    }

    /// <summary>The free memory of CUDA device <paramref name="device"/> in bytes, as the driver reports it.</summary>
    internal static long free_bytes(int device)
    {
        using var _ = CudaDriver.OnDevice(device);
        return FreeBytes();
    }

    private static bool ConcurrentAccess(int device) => CudaKernels.Attribute(device, CudaDriver.AttrConcurrentManagedAccess) != 0;

    private static long FreeBytes()
    {
        nuint free, total;
        CudaDriver.Check(CudaDriver.cuMemGetInfo(&free, &total), "cuMemGetInfo");
        return (long)free;
    }

    private static void Prefetch(ulong ptr, long size, int device, bool toHost)
    {
        if (CudaDriver.cuMemPrefetchAsyncV2 != null)
        {
            var location = new CudaDriver.MemLocation { Type = toHost ? 2 : 1, Id = toHost ? 0 : device };
            CudaDriver.Check(CudaDriver.cuMemPrefetchAsyncV2(ptr, (nuint)size, location, 0, CudaDriver.LegacyStream), "cuMemPrefetchAsync");
        }
        else
        {
            CudaDriver.Check(CudaDriver.cuMemPrefetchAsync(ptr, (nuint)size, toHost ? CudaDriver.DeviceCpu : device, CudaDriver.LegacyStream),
                "cuMemPrefetchAsync");
        }
    }

    internal static long ElementSize(ScalarType t) => t switch
    {
        ScalarType.Float32 or ScalarType.Int32 => 4,
        ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Int16 => 2,
        ScalarType.Float64 or ScalarType.Int64 => 8,
        ScalarType.Byte or ScalarType.Int8 or ScalarType.Bool => 1,
        _ => throw new ArgumentException($"unified memory buffers do not take {t}"),
    };
}
