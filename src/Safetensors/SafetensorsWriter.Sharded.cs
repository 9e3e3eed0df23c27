using System.Text.RegularExpressions;

namespace LoRAHub.Safetensors;

public static partial class SafetensorsWriter
{
    /// <summary>The single-file name transformers uses, and the name shards are derived from.</summary>
    public const string SingleFileName = "model.safetensors";

    /// <summary>
    /// Writes a checkpoint folder the way transformers' save_pretrained does: tensors in order, split into
    /// <c>model-00001-of-0000N.safetensors</c> shards of at most <paramref name="maxShardBytes"/> of tensor data (a
    /// tensor larger than that gets a shard of its own) plus <c>model.safetensors.index.json</c>; or, when everything
    /// fits in one shard, a single <c>model.safetensors</c> and no index. Shards get {"format": "pt"} metadata unless
    /// <paramref name="metadata"/> is given.
    /// </summary>
    /// <remarks>
    /// Each file is written atomically, the index last, so a reader never sees an index naming unwritten shards. Once
    /// everything is written, files left from an earlier save in the other layout (stale shards, a stale index or
    /// model.safetensors) are deleted so they cannot be mistaken for part of this checkpoint.
    /// </remarks>
    public static void WriteSharded(string folder, IEnumerable<SafetensorsEntry> entries, long maxShardBytes,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(folder);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxShardBytes);
        var list = Validate(entries, metadata); // across all shards, so a name cannot repeat in two shards
        metadata ??= new Dictionary<string, string> { ["format"] = "pt" };
        var shards = Plan(list, maxShardBytes);
        Directory.CreateDirectory(folder);
        var indexPath = Path.Combine(folder, ShardedSafetensors.IndexFileName);

        if (shards.Count == 1)
        {
            Write(Path.Combine(folder, SingleFileName), shards[0], metadata);
            // The index goes first: while it exists, readers prefer it, and it would name shards about to vanish.
            if (File.Exists(indexPath)) File.Delete(indexPath);
            DeleteStale(folder, keep: [SingleFileName]);
            return;
        }

        var weightMap = new List<KeyValuePair<string, string>>();
        var names = new List<string>();
        for (var i = 0; i < shards.Count; i++)
        {
            var file = ShardFileName(i + 1, shards.Count);
            Write(Path.Combine(folder, file), shards[i], metadata);
            names.Add(file);
            weightMap.AddRange(shards[i].Select(e => KeyValuePair.Create(e.Name, file)));
        }
        ShardIndex.Write(indexPath, weightMap, totalSize: list.Sum(e => e.ByteLength));
        DeleteStale(folder, keep: names);
        var single = Path.Combine(folder, SingleFileName);
        if (File.Exists(single)) File.Delete(single);
    }

    /// <summary>Whether <paramref name="name"/> is a shard of transformers' naming (<see cref="ShardFileName"/>).</summary>
    public static bool IsShardFileName(string name) => ShardName().IsMatch(name);

    /// <summary>transformers' shard name: 1-based index and count, five digits each.</summary>
    public static string ShardFileName(int index, int count) => $"model-{index:D5}-of-{count:D5}.safetensors";

    private static List<List<SafetensorsEntry>> Plan(List<SafetensorsEntry> entries, long maxShardBytes)
    {
        var shards = new List<List<SafetensorsEntry>> { new() };
        long size = 0;
        foreach (var entry in entries)
        {
            // Start a new shard when this tensor would overflow a non-empty one; an oversized tensor thus lands alone.
            if (shards[^1].Count > 0 && size + entry.ByteLength > maxShardBytes)
            {
                shards.Add([]);
                size = 0;
            }
            shards[^1].Add(entry);
            size += entry.ByteLength;
        }
        return shards;
    }

    private static void DeleteStale(string folder, IReadOnlyCollection<string> keep)
    {
        foreach (var path in Directory.EnumerateFiles(folder, "model-*-of-*.safetensors"))
        {
            var name = Path.GetFileName(path);
            if (IsShardFileName(name) && !keep.Contains(name)) File.Delete(path);
        }
    }

    [GeneratedRegex(@"^model-\d{5}-of-\d{5}\.safetensors$")]
    private static partial Regex ShardName();
}
