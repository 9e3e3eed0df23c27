namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>
/// Page-locked host buffers for offloaded activations, reused across layers and steps: pinning memory
/// (cuMemHostAlloc) costs milliseconds per call, so it happens once per buffer, not per copy. One pool per device, and
/// every copy into or out of its buffers runs on that device's side stream: a buffer handed back while its last copy is
/// still queued can be rented again at once, because the next copy that touches it queues behind that one.
/// </summary>
internal static class PinnedHostPool
{
    private static readonly object gate = new();
    private static readonly Dictionary<int, List<PinnedBuffer>> free = new();
    private static long reservedBytes, inUseBytes;

    /// <summary>Bytes of pinned memory the pool holds (free and rented).</summary>
    public static long ReservedBytes => Interlocked.Read(ref reservedBytes);

    /// <summary>Bytes of pinned memory rented out now (offloaded activations waiting for backward).</summary>
    public static long InUseBytes => Interlocked.Read(ref inUseBytes);

    /// <summary>
    /// A buffer of at least <paramref name="bytes"/> (rounded up to its <see cref="SizeClass"/>) for device
    /// <paramref name="device"/>'s side stream: the smallest free one that is not more than twice as large (so one huge
    /// buffer does not serve many small tensors), else a new one.
    /// </summary>
    public static PinnedBuffer Rent(int device, long bytes)
    {
        bytes = SizeClass(bytes);
        lock (gate)
        {
            if (free.TryGetValue(device, out var list))
            {
                PinnedBuffer? best = null;
                foreach (var b in list)
                    if (b.Bytes >= bytes && b.Bytes <= 2 * Math.Max(bytes, 1) && (best is null || b.Bytes < best.Bytes)) best = b;
                if (best is not null)
                {
                    list.Remove(best);
                    Interlocked.Add(ref inUseBytes, best.Bytes);
                    return best;
                }
            }
        }
        var p = CudaStreams.AllocHost(device, bytes);
        var buffer = new PinnedBuffer(device, p, bytes);
        Interlocked.Add(ref reservedBytes, bytes);
        Interlocked.Add(ref inUseBytes, bytes);
        return buffer;
    }

    /// <summary>
    /// Sizes are rounded up to eighths of a power of two (at least 64 KiB): batches whose length varies then share
    /// buffers instead of each pinning its own, for at most 12.5% more pinned memory than asked.
    /// </summary>
    internal static long SizeClass(long bytes)
    {
        const long minimum = 64 << 10;
        if (bytes <= minimum) return minimum;
        var step = (1L << (63 - System.Numerics.BitOperations.LeadingZeroCount((ulong)bytes))) / 8;
        return (bytes + step - 1) / step * step;
    }

    /// <summary>Hands a buffer back (its pending copies may still be queued on the side stream; see the class remarks).</summary>
    public static void Return(PinnedBuffer buffer)
    {
        lock (gate)
        {
            if (!free.TryGetValue(buffer.Device, out var list)) free[buffer.Device] = list = new();
            list.Add(buffer);
            Interlocked.Add(ref inUseBytes, -buffer.Bytes);
        }
    }

    /// <summary>Frees every buffer not rented out, after waiting for the side streams' queued copies.</summary>
    public static unsafe void Trim()
    {
        List<PinnedBuffer> released;
        lock (gate)
        {
            released = free.Values.SelectMany(l => l).ToList();
            free.Clear();
        }
        foreach (var device in released.Select(b => b.Device).Distinct())
        {
            using var _ = CudaDriver.OnDevice(device);
            CudaDriver.Check(CudaDriver.cuStreamSynchronize(CudaStreams.SideStream(device)), "cuStreamSynchronize");
        }
        foreach (var b in released)
        {
            CudaStreams.FreeHost(b.Device, b.Pointer);
            Interlocked.Add(ref reservedBytes, -b.Bytes);
        }
    }
}

/// <summary>One page-locked host allocation of the pool.</summary>
internal sealed class PinnedBuffer(int device, IntPtr pointer, long bytes)
{
    public int Device { get; } = device;
    public IntPtr Pointer { get; } = pointer;
    public long Bytes { get; } = bytes;
}
