using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Distributed;

/// <summary>
/// The ranks of a run and the collectives between them, in place on each rank's tensors (torch.distributed's
/// ProcessGroup). Every rank calls the same collectives in the same order with tensors of the same shape and type.
/// A collective that fails, or does not finish within <see cref="Timeout"/>, raises <see cref="DistributedException"/>
/// naming the failing or silent rank when it can be told; after that the group is unusable.
/// </summary>
public abstract class ProcessGroup : IDisposable
{
    protected ProcessGroup(DistributedEnvironment environment, TimeSpan timeout)
    {
        Environment = environment;
        Timeout = timeout;
    }

    public DistributedEnvironment Environment { get; }
    public int Rank => Environment.Rank;
    public int WorldSize => Environment.WorldSize;
    public TimeSpan Timeout { get; }

    /// <summary>"nccl" or "mpi".</summary>
    public abstract string Backend { get; }

    /// <summary>Combines the tensor across ranks; every rank ends with the result.</summary>
    public void all_reduce(Tensor tensor, ReduceOp op = ReduceOp.SUM)
    {
        Check(tensor, nameof(tensor));
        InPlace(tensor, t => AllReduce(t, op));
    }

    /// <summary>
    /// Starts an all-reduce of a contiguous tensor that may run concurrently with later compute (torch.distributed's
    /// <c>async_op=True</c>): it is ordered after the work enqueued so far, and <see cref="Work.wait"/> orders later
    /// compute after it. The tensor must stay alive and untouched until then. Collectives started this way and plain ones
    /// must still be issued in the same order on every rank. Backends without a separate communication stream (MPI)
    /// finish it before returning.
    /// </summary>
    public Work all_reduce_async(Tensor tensor, ReduceOp op = ReduceOp.SUM)
    {
        Check(tensor, nameof(tensor));
        if (!tensor.is_contiguous()) throw new ArgumentException("all_reduce_async needs a contiguous tensor (it is reduced in place, later)", nameof(tensor));
        return AllReduceAsync(tensor, op);
    }

    /// <summary>The backend's asynchronous all-reduce; by default the blocking one.</summary>
    protected virtual Work AllReduceAsync(Tensor tensor, ReduceOp op)
    {
        AllReduce(tensor, op);
        return Work.Completed;
    }

    /// <summary>Copies rank <paramref name="src"/>'s tensor to every rank.</summary>
    public void broadcast(Tensor tensor, int src)
    {
        Check(tensor, nameof(tensor));
        CheckRank(src);
        InPlace(tensor, t => Broadcast(t, src));
    }

    /// <summary>
    /// Concatenates every rank's <paramref name="input"/> along a flat first axis into <paramref name="output"/>, which
    /// holds WorldSize times as many elements (torch.distributed.all_gather_into_tensor).
    /// </summary>
    public void all_gather(Tensor output, Tensor input)
    {
        Check(output, nameof(output));
        Check(input, nameof(input));
        CheckPair(output, input, output.numel() == input.numel() * WorldSize, "all_gather: output must hold WorldSize × input elements");
        InPlace(output, o => AllGather(o, input.is_contiguous() ? input : input.contiguous()));
    }

    /// <summary>
    /// Reduces <paramref name="input"/> (WorldSize equal chunks) across ranks; rank r receives chunk r in
    /// <paramref name="output"/> (torch.distributed.reduce_scatter_tensor).
    /// </summary>
    public void reduce_scatter(Tensor output, Tensor input, ReduceOp op = ReduceOp.SUM)
    {
        Check(output, nameof(output));
        Check(input, nameof(input));
        CheckPair(output, input, input.numel() == output.numel() * WorldSize, "reduce_scatter: input must hold WorldSize × output elements");
        InPlace(output, o => ReduceScatter(o, input.is_contiguous() ? input : input.contiguous(), op));
    }

    /// <summary>Returns once every rank has called it.</summary>
    public void barrier()
    {
        ThrowIfFailed();
        Barrier();
    }

    /// <summary>Raises the error that ended the group (a watchdog timeout, a peer's failure) if there was one.</summary>
    public abstract void ThrowIfFailed();

    protected abstract void AllReduce(Tensor tensor, ReduceOp op);
    protected abstract void Broadcast(Tensor tensor, int src);
    protected abstract void AllGather(Tensor output, Tensor input);
    protected abstract void ReduceScatter(Tensor output, Tensor input, ReduceOp op);
    protected abstract void Barrier();

    /// <summary>The device type this backend's tensors live on.</summary>
    protected abstract DeviceType TensorDevice { get; }

    private void Check(Tensor tensor, string name)
    {
        ThrowIfFailed();
        if (tensor.device_type != TensorDevice)
            throw new ArgumentException($"the {Backend} process group works on {TensorDevice} tensors; '{name}' is on {tensor.device}. " +
                (TensorDevice == DeviceType.CUDA ? "Move the model to the rank's GPU (cuda:LOCAL_RANK)." : "Train on the CPU, or use the nccl backend on GPUs."));
    }

    private void CheckRank(int rank)
    {
        if (rank < 0 || rank >= WorldSize) throw new ArgumentOutOfRangeException(nameof(rank), $"rank {rank} is outside 0..{WorldSize - 1}");
    }

    private static void CheckPair(Tensor output, Tensor input, bool sizesOk, string sizeMessage)
    {
        if (output.dtype != input.dtype) throw new ArgumentException($"collective tensors differ in type: {output.dtype} and {input.dtype}");
        if (!sizesOk) throw new ArgumentException($"{sizeMessage} (output {output.numel()}, input {input.numel()})");
    }

    // Backends work on contiguous memory; a strided tensor goes through a contiguous copy.
    private static void InPlace(Tensor tensor, Action<Tensor> op)
    {
        if (tensor.is_contiguous())
        {
            op(tensor);
            return;
        }
        using var copy = tensor.contiguous();
        op(copy);
        using (no_grad()) tensor.copy_(copy);
    }

    public abstract void Dispose();
}
