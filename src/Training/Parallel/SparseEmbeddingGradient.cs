using LoRAHub.Abstractions;
using LoRAHub.Distributed;
using LoRAHub.TorchExtensions;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Training.Parallel;

/// <summary>
/// The token-embedding table's lookup gradient under data parallelism, exchanged as rows: the lookup of a training forward
/// goes through <see cref="IEmbeddingLookupHook"/> into a function whose backward keeps the token ids and their gradient
/// rows instead of a dense vocabulary-sized gradient; <see cref="Finish"/>, after the dense buckets, gathers every rank's
/// ids and rows (tokens × hidden, ~33 MB a rank for llama-1b 4×2048, where the table's dense all-reduce moves 525 MB) and
/// adds their sums per token into the table's gradient. A tied table's dense part (the output head's) is then complete at
/// the head's sync point and its bucket starts there, during backward, instead of after it (see <see cref="GradientSync"/>).
/// The sums per token are formed by the embedding's own backward over the gathered rows (sorted, deterministic), so every
/// rank adds the same values; the result is the dense all-reduce's up to the order of the additions.
/// </summary>
internal sealed class SparseEmbeddingGradient : IDisposable
{
    private readonly ProcessGroup group;
    private readonly IEmbeddingLookupHook model;
    private readonly Tensor table;
    private readonly List<(Tensor ids, Tensor rows)> pending = new();

    /// <summary>Whether the table is also the head (its dense gradient is bucketed; else only these rows make its gradient).</summary>
    public bool Tied { get; }

    public SparseEmbeddingGradient(ProcessGroup group, IEmbeddingLookupHook model, Tensor table)
    {
        if (model.EmbeddingLookup is not null)
            throw new InvalidOperationException("the model's EmbeddingLookup is already set: another data-parallel trainer is using this model; dispose it first");
        (this.group, this.model, this.table, Tied) = (group, model, table, model.EmbeddingTiedToHead);
        model.EmbeddingLookup = Lookup;
    }

    // In forward (grad mode on, the table trains): the lookup as a function that hands its gradient rows here.
    private Tensor? Lookup(Tensor weight, Tensor ids) =>
        ReferenceEquals(weight, table) || torchx.data_ptr(weight) == torchx.data_ptr(table) ? new RowsLookup(this).apply(weight, ids)[0] : null;

    private void Add(Tensor ids, Tensor rows)
    {
        lock (pending) pending.Add((ids.DetachFromDisposeScope(), rows.DetachFromDisposeScope()));
    }

    /// <summary>
    /// After the dense buckets (the table's gradient holds the head's part, reduced, or none): gathers every rank's rows,
    /// sums them per token and adds them, times <paramref name="scale"/>, into the table's gradient. Every rank calls it
    /// once per step (with or without rows of its own).
    /// </summary>
    public void Finish(double scale = 1.0)
    {
        List<(Tensor ids, Tensor rows)> parts;
        lock (pending)
        {
            parts = pending.ToList();
            pending.Clear();
        }
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            long hidden = table.size(1);
            var ids = parts.Count == 0 ? empty([0], ScalarType.Int64, table.device) : cat(parts.Select(p => p.ids.reshape(-1)).ToArray());
            var rows = parts.Count == 0 ? empty([0, hidden], table.dtype, table.device)
                : cat(parts.Select(p => p.rows.reshape(-1, hidden).to(table.dtype)).ToArray());
            // Equal-sized pieces for the gather: every rank pads to the most rows any rank has (id 0, zero rows: adds nothing).
            var count = tensor(new[] { ids.size(0) }, ScalarType.Int64, table.device);
            var counts = empty([group.WorldSize], ScalarType.Int64, table.device);
            group.all_gather(counts, count);
            var most = counts.max().item<long>();
            if (most == 0) return;
            var pad = most - ids.size(0);
            if (pad > 0)
            {
                ids = cat([ids, zeros([pad], ScalarType.Int64, table.device)]);
                rows = cat([rows, zeros([pad, hidden], rows.dtype, rows.device)]);
            }
            var allIds = empty([group.WorldSize * most], ScalarType.Int64, table.device);
            var allRows = empty([group.WorldSize * most, hidden], rows.dtype, rows.device);
            group.all_gather(allIds, ids);
            group.all_gather(allRows, rows.contiguous());
            // Sums per distinct token: the embedding's own backward over a table of the distinct tokens (sorted segments).
            var (tokens, inverse, _) = torch.unique(allIds, sorted: true, return_inverse: true);
            var sums = PerToken(inverse!, allRows, tokens.size(0));
            if (scale != 1.0) sums.mul_(scale);
            var grad = table.grad;
            // Untied: the rows are the whole gradient (the .grad set here holds its own reference; ours goes with the scope).
            if (grad is null) table.grad = grad = zeros_like(table);
            grad.index_add_(0, tokens, sums.to(grad.dtype), 1);
        }
        finally
        {
            foreach (var (i, r) in parts)
            {
                i.Dispose();
                r.Dispose();
            }
        }
    }

    // Σ rows over equal inverse indices, as the dense embedding backward forms it (in the rows' dtype, fp32 inside).
    private static Tensor PerToken(Tensor inverse, Tensor rows, long distinct)
    {
        using var grad = enable_grad();
        // Its values do not matter (only the weight's gradient is read); zeros, so no random numbers are drawn.
        using var lookup = nn.Embedding_from_pretrained(zeros([distinct, rows.size(1)], rows.dtype, rows.device), freeze: false);
        var e = lookup.call(inverse);
        e.backward([rows]);
        return lookup.weight!.grad!.detach();
    }

    /// <summary>Drops rows kept by a backward whose step did not finish (a failure between forward and <see cref="Finish"/>).</summary>
    public void Reset()
    {
        lock (pending)
        {
            foreach (var (i, r) in pending)
            {
                i.Dispose();
                r.Dispose();
            }
            pending.Clear();
        }
    }

    /// <summary>Removes the hook from the model and drops kept rows.</summary>
    public void Dispose()
    {
        if (model.EmbeddingLookup == Lookup) model.EmbeddingLookup = null;
        Reset();
    }

    /// <summary>The lookup; its backward keeps (ids, gradient rows) for <see cref="Finish"/> and gives the table no dense gradient.</summary>
    private sealed class RowsLookup(SparseEmbeddingGradient sink) : CustomFunction
    {
        private Tensor? ids;

        protected override string name => "data-parallel embedding lookup";

        protected override Tensor[] forward(Tensor?[] inputs)
        {
            ids = save(inputs[1]!);
            var t = inputs[0]!;
            return [t.index_select(0, ids.reshape(-1)).reshape([.. ids.shape, t.size(1)])];
        }

        protected override Tensor?[] backward(Tensor[] grad_outputs)
        {
            // Copies: the ids are the caller's, and autograd may still accumulate in place into memory an incoming
            // gradient shares with another node's input buffer.
            sink.Add(ids!.clone(), grad_outputs[0].detach().clone());
            return [null, null];
        }
    }
}
