using LoRAHub.Distributed;
using LoRAHub.Training.Data;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Training.Parallel;

/// <summary>
/// The trainer's side of data parallelism. Every rank reads the same global batch (BatchSize × WorldSize rows, the
/// batch one rank would read with that batch size) and keeps its contiguous slice of rows, so the data order, and the
/// loader position saved in checkpoints, do not depend on the number of ranks: a run resumes on any number of ranks.
/// With one rank (no group) every method is the single-process behaviour.
/// </summary>
internal sealed class DataParallel
{
    private readonly ProcessGroup? group;
    private readonly Device device;

    public DataParallel(ProcessGroup? group, Device device)
    {
        this.group = group;
        this.device = device;
    }

    public ProcessGroup? Group => group;
    public int Rank => group?.Rank ?? 0;
    public int WorldSize => group?.WorldSize ?? 1;
    public bool IsMain => Rank == 0;

    /// <summary>
    /// This rank's rows of a global batch collated on the CPU, trimmed to their longest row, on the device, and the
    /// number of tokens they contribute to the next-token loss (labels from position 1 on that are not -100);
    /// null when the slice is empty.
    /// </summary>
    public (Batch batch, long targets)? Shard(Batch global)
    {
        var rows = (int)global.InputIds.size(0);
        var start = (int)((long)Rank * rows / WorldSize);
        var end = (int)((long)(Rank + 1) * rows / WorldSize);
        if (end <= start) return null;
        using var scope = NewDisposeScope();
        var mask = global.AttentionMask.narrow(0, start, end - start);
        var length = Math.Max(1, mask.sum(dim: 1).max().item<long>());
        var ids = global.InputIds.narrow(0, start, end - start).narrow(1, 0, length);
        var labels = global.Labels.narrow(0, start, end - start).narrow(1, 0, length);
        mask = mask.narrow(1, 0, length);
        var targets = length < 2 ? 0 : labels.narrow(1, 1, length - 1).ne(Data.TokenizedExample.IgnoreIndex).sum().item<long>();
        return (new Batch
        {
            InputIds = ids.to(device).DetachFromDisposeScope(),
            Labels = labels.to(device).DetachFromDisposeScope(),
            AttentionMask = mask.to(device).DetachFromDisposeScope(),
            Tokens = (int)mask.sum().item<long>(),
            LabelTokens = (int)labels.ne(Data.TokenizedExample.IgnoreIndex).sum().item<long>(),
        }, targets);
    }

    /// <summary>Sums host values over the ranks (one small collective); the values themselves with one rank.</summary>
    public double[] SumOverRanks(params double[] values)
    {
        if (group == null) return values;
        using var t = tensor(values, ScalarType.Float64, device);
        group.all_reduce(t);
        using var host = t.cpu();
        return host.data<double>().ToArray();
    }

    /// <summary>Sums a device tensor over the ranks in place (no host sync on NCCL).</summary>
    public void SumOverRanks(Tensor t) => group?.all_reduce(t);

    public void Barrier() => group?.barrier();

    public void ThrowIfFailed() => group?.ThrowIfFailed();
}
