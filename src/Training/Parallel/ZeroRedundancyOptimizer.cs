using System.Text.Json;
using LoRAHub.Distributed;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Training.Parallel;

/// <summary>
/// ZeRO stage 1 (torch.distributed.optim.ZeroRedundancyOptimizer): each rank owns a contiguous share of the parameters,
/// balanced by element count, and keeps optimizer state for those only; after the (already all-reduced) gradients are
/// clipped, each rank steps its own parameters with the method's optimizer, then every owner broadcasts its updated
/// parameters. Whole parameters are owned (GaLore projects whole matrices).
/// Checkpoints see the state of the unsharded optimizer ("group.index.name" over all parameters): ranks send their
/// shares to rank 0 before it saves (<see cref="GatherToRank0"/>), and every rank loads its share from that file, so a
/// run resumes with any number of ranks.
/// </summary>
public sealed class ZeroRedundancyOptimizer : Optimizer
{
    private readonly ProcessGroup group;
    private readonly Optimizer local;
    private readonly long bucketBytes;
    private readonly Dictionary<ParamGroup, (int index, ParamGroup global)> localGroups = new(ReferenceEqualityComparer.Instance);
    private readonly Dictionary<Tensor, int> globalIndex = new(ReferenceEqualityComparer.Instance);
    private readonly List<List<Tensor>> owned = new();
    private Dictionary<string, Tensor>? lastLocal;
    private Dictionary<string, Tensor>? gathered;

    /// <param name="groups">The method's parameter groups (non-empty ones), as for the unsharded optimizer.</param>
    /// <param name="create">Makes the method's optimizer for some groups (this rank's share).</param>
    public ZeroRedundancyOptimizer(ProcessGroup group, IReadOnlyList<ParamGroup> groups, Func<IReadOnlyList<ParamGroup>, Optimizer> create,
        long bucketBytes = GradientBuckets.DefaultBucketBytes) : base(groups)
    {
        this.group = group;
        this.bucketBytes = bucketBytes;
        Owners = Partition(param_groups.SelectMany(g => g.Parameters).Select(p => p.numel()).ToList(), group.WorldSize);
        var all = param_groups.SelectMany(g => g.Parameters).ToList();
        for (var r = 0; r < group.WorldSize; r++) owned.Add(all.Where((_, i) => Owners[i] == r).ToList());
        var mine = new HashSet<Tensor>(owned[group.Rank], ReferenceEqualityComparer.Instance);
        var shares = new List<ParamGroup>();
        for (var gi = 0; gi < param_groups.Count; gi++)
        {
            var g = param_groups[gi];
            for (var i = 0; i < g.Parameters.Count; i++) globalIndex[g.Parameters[i]] = i;
            var share = new ParamGroup(g.Parameters.Where(mine.Contains), g.lr, g.weight_decay, g.Name) { initial_lr = g.initial_lr };
            if (share.Parameters.Count == 0) continue;
            localGroups[share] = (gi, g);
            shares.Add(share);
        }
        if (shares.Count == 0)
            throw new ArgumentException($"ZeRO: rank {group.Rank} owns no parameter ({all.Count} parameters for {group.WorldSize} ranks); " +
                "use fewer ranks or turn ShardOptimizerState off");
        local = create(shares);
    }

    /// <summary>The owning rank of each parameter, in group order.</summary>
    public IReadOnlyList<int> Owners { get; }

    /// <summary>This rank's optimizer (over its share).</summary>
    public Optimizer Local => local;

    /// <summary>Contiguous ranges of roughly equal element count (parameter i goes to the rank whose range holds its middle).</summary>
    public static int[] Partition(IReadOnlyList<long> sizes, int ranks)
    {
        var total = (double)Math.Max(1, sizes.Sum());
        var owners = new int[sizes.Count];
        long before = 0;
        for (var i = 0; i < sizes.Count; i++)
        {
            var middle = before + sizes[i] / 2.0;
            owners[i] = Math.Min(ranks - 1, (int)(middle / total * ranks));
            before += sizes[i];
        }
        return owners;
    }

    public override void step()
    {
        foreach (var (share, (_, global)) in localGroups)
        {
            share.lr = global.lr;
            share.weight_decay = global.weight_decay;
        }
        local.step();
        for (var r = 0; r < group.WorldSize; r++)
            if (owned[r].Count > 0) ParameterBroadcast.Run(group, owned[r], r, bucketBytes);
    }

    public override Dictionary<string, Tensor> state_tensors()
    {
        if (gathered != null) return gathered;
        lastLocal = local.state_tensors();
        return lastLocal.ToDictionary(kv => GlobalKey(kv.Key), kv => kv.Value);
    }

    private string GlobalKey(string localKey)
    {
        var parts = localKey.Split('.', 3);
        var share = local.param_groups[int.Parse(parts[0])];
        var (gi, _) = localGroups[share];
        return $"{gi}.{globalIndex[share.Parameters[int.Parse(parts[1])]]}.{parts[2]}";
    }

    /// <summary>The base class has copied the loaded values into the tensors <see cref="state_tensors"/> returned: pass them to the local optimizer.</summary>
    protected override void OnStateLoaded()
    {
        if (lastLocal == null) return;
        var copies = lastLocal.ToDictionary(kv => kv.Key, kv => kv.Value.clone());
        try { local.load_state_tensors(copies); }
        finally { foreach (var t in copies.Values) t.Dispose(); }
    }

    /// <summary>
    /// Collective: every rank sends its share of the state to rank 0, which then sees the whole (unsharded) state in
    /// <see cref="state_tensors"/> until the scope ends (for the checkpoint it writes).
    /// </summary>
    public IDisposable GatherToRank0(Device device)
    {
        var mine = state_tensors();
        var all = new Dictionary<string, Tensor>();
        for (var r = 0; r < group.WorldSize; r++)
        {
            var header = r == group.Rank
                ? JsonSerializer.SerializeToUtf8Bytes(mine.Select(kv => new Entry(kv.Key, kv.Value.dtype.ToString(), kv.Value.shape)).ToList())
                : null;
            var entries = JsonSerializer.Deserialize<List<Entry>>(BroadcastBytes(header, r, device))!;
            foreach (var e in entries)
            {
                var t = r == group.Rank ? mine[e.Key].detach().clone() : empty(e.Shape, Enum.Parse<ScalarType>(e.DType), device);
                group.broadcast(t, r);
                // Rank 0 keeps the whole state in host memory (it is only written to the checkpoint), not on its GPU.
                if (group.Rank == 0) all[e.Key] = (t.device_type == DeviceType.CPU ? t : t.cpu()).DetachFromDisposeScope();
                if (group.Rank != 0 || t.device_type != DeviceType.CPU) t.Dispose();
            }
        }
        if (group.Rank == 0) gathered = all;
        return new Release(this);
    }

    private sealed record Entry(string Key, string DType, long[] Shape);

    private sealed class Release(ZeroRedundancyOptimizer owner) : IDisposable
    {
        public void Dispose()
        {
            if (owner.gathered == null) return;
            foreach (var t in owner.gathered.Values) t.Dispose();
            owner.gathered = null;
        }
    }

    private byte[] BroadcastBytes(byte[]? data, int src, Device device)
    {
        using var length = tensor(new[] { (long)(data?.Length ?? 0) }, device: device);
        group.broadcast(length, src);
        var n = length.cpu().item<long>();
        using var bytes = data != null ? tensor(data, device: device) : zeros(n, ScalarType.Byte, device);
        group.broadcast(bytes, src);
        return bytes.cpu().data<byte>().ToArray();
    }

    public override void Dispose() => local.Dispose();
}
