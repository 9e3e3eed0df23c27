using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Training.Data;

/// <summary>A batch on the training device.</summary>
public sealed class Batch : IDisposable
{
    public required Tensor InputIds { get; init; }
    public required Tensor Labels { get; init; }
    /// <summary>(batch, seq) int64: 1 for real tokens, 0 for padding.</summary>
    public required Tensor AttentionMask { get; init; }
    /// <summary>
    /// (batch, seq) int64 for packed rows (<see cref="SequencePacking"/>): each example's positions from 0; null for
    /// padded rows (one example each, positions 0, 1, ...).
    /// </summary>
    public Tensor? PositionIds { get; init; }
    public int Tokens { get; init; }
    public int LabelTokens { get; init; }

    public void Dispose()
    {
        InputIds.Dispose();
        Labels.Dispose();
        AttentionMask.Dispose();
        PositionIds?.Dispose();
    }
}

/// <summary>Where a loader is in its data: saved in checkpoints so a resumed run sees the same batches.</summary>
public sealed record LoaderPosition(int Epoch, int Index);

/// <summary>
/// Endless batches over a dataset: a seeded shuffle per epoch, right padding (labels -100, mask 0), and optional
/// concatenation of short examples into sequences of maxLength (<paramref name="pack"/>: no boundaries, attention crosses
/// examples; the trainer's padding-free packing is <see cref="SequencePacking"/>, applied to each batch).
/// </summary>
public sealed class DataLoader
{
    private readonly IReadOnlyList<TokenizedExample> source;
    private readonly int batchSize, padTokenId, maxLength;
    private readonly long seed;
    private readonly bool shuffle;
    private IReadOnlyList<TokenizedExample> epochOrder = [];

    public DataLoader(TextDataset dataset, int batchSize, int padTokenId, long seed, bool shuffle = true, bool pack = false, int maxLength = 1024)
    {
        if (dataset.Count == 0) throw new ArgumentException("the dataset is empty");
        source = pack ? Pack(dataset.Examples, maxLength) : dataset.Examples;
        this.batchSize = batchSize;
        this.padTokenId = padTokenId;
        this.seed = seed;
        this.shuffle = shuffle;
        this.maxLength = maxLength;
        Position = new LoaderPosition(0, 0);
        Reorder();
    }

    public LoaderPosition Position { get; private set; }
    public int BatchesPerEpoch => (source.Count + batchSize - 1) / batchSize;
    public int SequenceCount => source.Count;

    public void Seek(LoaderPosition position)
    {
        Position = position;
        Reorder();
    }

    private void Reorder()
    {
        if (!shuffle)
        {
            epochOrder = source;
            return;
        }
        var order = source.ToArray();
        new Random(unchecked((int)(seed * 1_000_003 + Position.Epoch))).Shuffle(order);
        epochOrder = order;
    }

    /// <summary>The next batch; wraps into the next epoch (reshuffled) at the end.</summary>
    public Batch Next(Device device)
    {
        if (Position.Index >= epochOrder.Count)
        {
            Position = new LoaderPosition(Position.Epoch + 1, 0);
            Reorder();
        }
        var take = epochOrder.Skip(Position.Index).Take(batchSize).ToList();
        Position = Position with { Index = Position.Index + take.Count };
        return Collate(take, padTokenId, device);
    }

    /// <summary>Every batch once, in order (for evaluation).</summary>
    public IEnumerable<Batch> Sequential(Device device)
    {
        for (var i = 0; i < source.Count; i += batchSize)
            yield return Collate(source.Skip(i).Take(batchSize).ToList(), padTokenId, device);
    }

    public static Batch Collate(IReadOnlyList<TokenizedExample> examples, int padTokenId, Device device)
    {
        var length = examples.Max(e => e.Length);
        var ids = new long[examples.Count * length];
        var labels = new long[ids.Length];
        var mask = new long[ids.Length];
        Array.Fill(ids, padTokenId);
        Array.Fill(labels, TokenizedExample.IgnoreIndex);
        var tokens = 0;
        var labelTokens = 0;
        for (var b = 0; b < examples.Count; b++)
        {
            var e = examples[b];
            for (var t = 0; t < e.Length; t++)
            {
                ids[b * length + t] = e.InputIds[t];
                labels[b * length + t] = e.Labels[t];
                mask[b * length + t] = 1;
            }
            tokens += e.Length;
            labelTokens += e.LabelCount;
        }
        long[] shape = [examples.Count, length];
        return new Batch
        {
            InputIds = torch.tensor(ids, shape, device: device).DetachFromDisposeScope(),
            Labels = torch.tensor(labels, shape, device: device).DetachFromDisposeScope(),
            AttentionMask = torch.tensor(mask, shape, device: device).DetachFromDisposeScope(),
            Tokens = tokens,
            LabelTokens = labelTokens,
        };
    }

    /// <summary>Greedy packing: concatenates examples in order into sequences of at most maxLength tokens.</summary>
    public static IReadOnlyList<TokenizedExample> Pack(IReadOnlyList<TokenizedExample> examples, int maxLength)
    {
        var packed = new List<TokenizedExample>();
        var ids = new List<int>();
        var labels = new List<int>();
        foreach (var e in examples)
        {
            if (ids.Count > 0 && ids.Count + e.Length > maxLength)
            {
                packed.Add(new TokenizedExample(ids.ToArray(), labels.ToArray()));
                ids.Clear();
                labels.Clear();
            }
            ids.AddRange(e.InputIds.Take(maxLength));
            labels.AddRange(e.Labels.Take(maxLength));
        }
        if (ids.Count > 0) packed.Add(new TokenizedExample(ids.ToArray(), labels.ToArray()));
        return packed;
    }
}
