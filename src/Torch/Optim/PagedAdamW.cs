namespace LoRAHub.Torch.Optim;

/// <summary>
/// AdamW with its moment buffers in CUDA unified (managed) memory, as bitsandbytes' PagedAdamW (QLoRA's paged
/// optimizer): under GPU memory pressure the driver pages the state out to host memory instead of the step failing, and
/// before each step the state is prefetched back to the GPU, asynchronously on the current stream. The update math is
/// AdamW's (the fused kernel on CUDA). As in bitsandbytes, only tensors of at least <see cref="min_paged_numel"/> values
/// are paged; smaller ones, and all state of CPU parameters, are ordinary tensors. Unified memory is never requested
/// beyond the GPU's free memory minus <see cref="headroom_bytes"/>: such a request throws OutOfMemoryTorchException.
/// </summary>
public sealed class PagedAdamW : AdamW
{
    /// <summary>bitsandbytes pages tensors of more than 1e5 values.</summary>
    public const long DefaultMinPagedNumel = 100_000;

    /// <summary>GPU memory that must stay free after a unified-memory allocation.</summary>
    public const long DefaultHeadroomBytes = 512L << 20;

    public PagedAdamW(IEnumerable<Tensor> parameters, double lr = 1e-3, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8,
        double weight_decay = 0.01, bool fused = true, long min_paged_numel = DefaultMinPagedNumel, long headroom_bytes = DefaultHeadroomBytes)
        : this([new ParamGroup(parameters, lr, weight_decay)], beta1, beta2, eps, fused, min_paged_numel, headroom_bytes)
    {
    }

    public PagedAdamW(IEnumerable<ParamGroup> groups, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8, bool fused = true,
        long min_paged_numel = DefaultMinPagedNumel, long headroom_bytes = DefaultHeadroomBytes)
        : base(groups, beta1, beta2, eps, fused)
    {
        if (min_paged_numel < 0) throw new ArgumentOutOfRangeException(nameof(min_paged_numel), "must be non-negative");
        if (headroom_bytes < 0) throw new ArgumentOutOfRangeException(nameof(headroom_bytes), "must be non-negative");
        this.min_paged_numel = min_paged_numel;
        this.headroom_bytes = headroom_bytes;
    }

    public long min_paged_numel { get; }
    public long headroom_bytes { get; }

    private readonly List<Tensor> paged = new();

    /// <summary>The state tensors that live in unified memory.</summary>
    public IReadOnlyList<Tensor> paged_tensors => paged;

    /// <summary>Bytes of state in unified memory.</summary>
    public long paged_bytes => paged.Where(t => !t.IsInvalid).Sum(t => t.numel() * t.element_size());

    protected override Tensor NewMomentState(Tensor p, ScalarType type)
    {
        if (!p.is_cuda || p.numel() < min_paged_numel) return base.NewMomentState(p, type);
        var t = UnifiedMemory.zeros(p.shape, type, p.device, headroom_bytes);
        paged.Add(t);
        return t;
    }

    public override void step()
    {
        // bitsandbytes' prefetch_state: bring paged-out state back before the update reads it.
        foreach (var t in paged) UnifiedMemory.prefetch(t);
        base.step();
    }

    /// <summary>Moves every paged state tensor to host memory (e.g. before evaluation, to give the GPU its memory).</summary>
    public void page_out()
    {
        foreach (var t in paged) UnifiedMemory.prefetch(t, to_host: true);
    }

    public override void Dispose()
    {
        base.Dispose();
        paged.Clear();
    }
}

/// <summary>CUDA unified (managed) memory as tensors: allocation within the GPU's free memory, prefetch, queries.</summary>
public static unsafe class UnifiedMemory
{
    /// <summary>
    /// A zero-filled tensor on a CUDA device whose memory is cudaMallocManaged memory (freed with the tensor). Throws
    /// OutOfMemoryTorchException, allocating nothing, when its size plus <paramref name="headroom_bytes"/> exceeds the GPU's
    /// free memory; ArgumentException for a CPU device.
    /// </summary>
    public static Tensor zeros(long[] shape, ScalarType dtype, Device device, long headroom_bytes = PagedAdamW.DefaultHeadroomBytes)
    {
        if (!device.IsCuda) throw new ArgumentException($"unified memory is CUDA memory; got device {device}", nameof(device));
        fixed (long* s = shape)
            return new Tensor(Native.lh_managed_zeros(s, shape.Length, (int)dtype, Math.Max(0, device.Index), headroom_bytes));
    }

    /// <summary>Prefetches a managed tensor's pages to its GPU (or to the host); a no-op for other tensors.</summary>
    public static void prefetch(Tensor t, bool to_host = false) => Native.Check(Native.lh_managed_prefetch(t.Handle, to_host ? 1 : 0));

    public static bool is_managed(Tensor t) => Native.lh_managed_is_managed(t.Handle) != 0;

    /// <summary>Bytes of unified memory currently allocated through <see cref="zeros"/>.</summary>
    public static long allocated_bytes => Native.lh_managed_bytes();

    /// <summary>Number of live unified-memory allocations made through <see cref="zeros"/>.</summary>
    public static long allocation_count => Native.lh_managed_count();
}
