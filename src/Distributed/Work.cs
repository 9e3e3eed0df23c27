namespace LoRAHub.Distributed;

/// <summary>
/// A collective started with <see cref="ProcessGroup.all_reduce_async"/> (torch.distributed's Work): <see cref="wait"/>
/// orders the compute that follows after it. On NCCL the host does not block (the default stream waits for the
/// collective's completion event); backends that finish collectives before returning hand out a completed Work.
/// </summary>
public class Work
{
    /// <summary>A collective that has already finished.</summary>
    public static readonly Work Completed = new();

    /// <summary>Later compute (on the default stream) sees the collective's result; call once.</summary>
    public virtual void wait()
    {
    }
}
