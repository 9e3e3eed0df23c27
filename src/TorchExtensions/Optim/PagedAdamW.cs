using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Optim;

/// <summary>
/// AdamW with its moment buffers in CUDA unified (managed) memory, as bitsandbytes' PagedAdamW (QLoRA's paged
/// optimizer): under GPU memory pressure the driver pages the state out to host memory instead of the step failing, and
/// before a step taken under pressure it is prefetched back to the GPU, asynchronously on the legacy default stream. The update is
/// AdamW's step itself (the same multi-tensor kernel launch, same scalars), which reads the managed memory through raw
/// pointers (it is not a tensor: TorchSharp cannot wrap foreign memory); only where the moments live differs, so the
/// parameters equal AdamW's bit for bit. As in bitsandbytes, only tensors of at least <see cref="min_paged_numel"/> values are
/// paged; smaller ones, all state of CPU parameters, and all state where the kernel cannot run (fused off, LoRAHub's
/// CUDA kernels unavailable, a dtype or layout the kernel does not take) are ordinary tensors. Unified memory is never
/// requested beyond the GPU's free memory minus <see cref="headroom_bytes"/>: such a request throws
/// OutOfMemoryTorchException. Checkpoints see paged state as copies (<see cref="Optimizer.state_tensors"/>).
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

    private readonly List<ManagedBuffer> paged = new();

    /// <summary>The moment buffers that live in unified memory.</summary>
    public IReadOnlyList<ManagedBuffer> paged_buffers => paged;

    /// <summary>Bytes of state in unified memory.</summary>
    public long paged_bytes => paged.Where(b => !b.IsDisposed).Sum(b => b.Bytes);

    private protected override Moment NewMomentState(Tensor p, ScalarType type)
    {
        if (!KernelApplies(p) || p.numel() < min_paged_numel) return base.NewMomentState(p, type);
        var buffer = UnifiedMemory.zeros(p.shape, type, p.device, headroom_bytes);
        paged.Add(buffer);
        return new Moment(null, buffer);
    }

    public override void step()
    {
        // bitsandbytes' prefetch_state brings paged-out state back before every update. A prefetch costs the host about
        // 0.25 ms even when the pages are on the GPU (llama-7b QLoRA r16: 192 buffers, 48 ms of a 360 ms step), and the
        // driver moves managed pages out only under memory pressure: so they are prefetched only while the device's free
        // memory is below their size plus the headroom. A page moved out at an earlier peak of the step faults back in
        // on the update's read instead: a prefetch is a hint, never needed for correctness.
        foreach (var device in paged.GroupBy(b => b.Device))
            if (UnifiedMemory.free_bytes(device.Key) < device.Sum(b => b.Bytes) + headroom_bytes)
                foreach (var b in device) UnifiedMemory.prefetch(b);
        base.step();
    }

    /// <summary>Moves every paged buffer to host memory (e.g. before evaluation, to give the GPU its memory).</summary>
    public void page_out()
    {
        foreach (var b in paged) UnifiedMemory.prefetch(b, to_host: true);
    }

    public override void Dispose()
    {
        base.Dispose();
        paged.Clear();
    }
}
