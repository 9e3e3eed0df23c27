using System.Diagnostics.CodeAnalysis;

namespace LoRAHub.Safetensors;

/// <summary>
/// One lookup API over a checkpoint, whether it is a single safetensors file or a folder of shards described by
/// <c>model.safetensors.index.json</c>. Shards are opened on first use, once each. Spans stay valid until Dispose.
/// </summary>
public sealed class ShardedSafetensors : IDisposable
{
    public const string IndexFileName = "model.safetensors.index.json";

    private readonly string folder;
    private readonly string source; // the index or the single file, for messages
    private readonly Dictionary<string, string> shardOf;
    private readonly Dictionary<string, SafetensorsFile> opened = new(StringComparer.Ordinal);
    private readonly Lock gate = new();
    private bool disposed;

    private ShardedSafetensors(string folder, string? indexPath, string source, IReadOnlyList<string> names, Dictionary<string, string> shardOf)
    {
        this.folder = folder;
        IndexPath = indexPath;
        this.source = source;
        Names = names;
        this.shardOf = shardOf;
    }

    /// <summary>The tensor names: the index's order for a sharded checkpoint, the header's order for a single file.</summary>
    public IReadOnlyList<string> Names { get; }

    /// <summary>The index file, or null when the checkpoint is a single file.</summary>
    public string? IndexPath { get; }

    /// <summary>
    /// Opens <paramref name="folderOrFile"/>: a safetensors file (such as adapter_model.safetensors), or a folder with
    /// model.safetensors.index.json, else with model.safetensors, else with exactly one *.safetensors file. The index
    /// file itself may also be given.
    /// </summary>
    public static ShardedSafetensors Open(string folderOrFile)
    {
        ArgumentException.ThrowIfNullOrEmpty(folderOrFile);
        if (File.Exists(folderOrFile))
            return folderOrFile.EndsWith(".index.json", StringComparison.Ordinal)
                ? FromIndex(Path.GetDirectoryName(Path.GetFullPath(folderOrFile))!, folderOrFile)
                : FromFile(folderOrFile);
        if (!Directory.Exists(folderOrFile))
            throw new FileNotFoundException($"no safetensors file or checkpoint folder at {folderOrFile}", folderOrFile);

        var index = Path.Combine(folderOrFile, IndexFileName);
        if (File.Exists(index)) return FromIndex(folderOrFile, index);
        var single = Path.Combine(folderOrFile, SafetensorsWriter.SingleFileName);
        if (File.Exists(single)) return FromFile(single);
        var candidates = Directory.GetFiles(folderOrFile, "*.safetensors");
        if (candidates.Length == 0 && PickleFiles.InFolder(folderOrFile) is { Count: > 0 } pickles)
            throw PickleFiles.Refuse(folderOrFile,
                $"the folder has only PyTorch pickle weights ({string.Join(", ", pickles.Take(5))}) and no .safetensors file");
        return candidates.Length switch
        {
            1 => FromFile(candidates[0]),
            0 => throw new FileNotFoundException(
                $"{folderOrFile} has no .safetensors file and no {IndexFileName}; point at the checkpoint folder or file", folderOrFile),
            _ => throw new SafetensorsFormatException(folderOrFile, null,
                $"the folder has {candidates.Length} .safetensors files ({string.Join(", ", candidates.Select(Path.GetFileName).Order(StringComparer.Ordinal))}) but no {IndexFileName} saying which tensor is in which; open one file directly or add the index"),
        };
    }

    public bool Contains(string name) => shardOf.ContainsKey(name);

    /// <summary>The tensor's header entry (offsets relative to its shard's data section).</summary>
    public TensorInfo Info(string name) => FileFor(name)[name];

    public bool TryGetInfo(string name, [MaybeNullWhen(false)] out TensorInfo info)
    {
        info = Contains(name) ? Info(name) : null;
        return info is not null;
    }

    /// <summary>The tensor's bytes in its mapped shard; valid until Dispose.</summary>
    public ReadOnlySpan<byte> GetBytes(string name) => FileFor(name).GetBytes(name);

    /// <summary>A copy of the tensor's bytes.</summary>
    public byte[] ReadBytes(string name) => FileFor(name).ReadBytes(name);

    public void Dispose()
    {
        lock (gate)
        {
            if (disposed) return;
            disposed = true;
            foreach (var file in opened.Values) file.Dispose();
            opened.Clear();
        }
    }

    private static ShardedSafetensors FromFile(string path)
    {
        var file = SafetensorsFile.Open(path);
        var name = Path.GetFileName(path);
        var names = file.Tensors.Select(t => t.Name).ToList().AsReadOnly();
        var checkpoint = new ShardedSafetensors(Path.GetDirectoryName(Path.GetFullPath(path))!, null, path, names,
            names.ToDictionary(n => n, _ => name, StringComparer.Ordinal));
        checkpoint.opened[name] = file;
        return checkpoint;
    }

    private static ShardedSafetensors FromIndex(string folder, string indexPath)
    {
        var weightMap = ShardIndex.Read(indexPath);
        // Missing shards are reported now, not at the first lookup that happens to need one.
        foreach (var group in weightMap.GroupBy(kv => kv.Value, StringComparer.Ordinal))
        {
            var shardPath = Path.Combine(folder, group.Key);
            if (!File.Exists(shardPath))
                throw new SafetensorsFormatException(indexPath, group.First().Key,
                    $"the index puts this tensor ({group.Count()} in all) in shard '{group.Key}', but {shardPath} does not exist; the download is incomplete: fetch the missing shard or re-download the checkpoint");
        }
        var names = weightMap.Select(kv => kv.Key).ToList().AsReadOnly();
        return new ShardedSafetensors(folder, indexPath, indexPath, names, weightMap.ToDictionary(kv => kv.Key, kv => kv.Value, StringComparer.Ordinal));
    }

    private SafetensorsFile FileFor(string name)
    {
        if (!shardOf.TryGetValue(name, out var shard))
            throw new KeyNotFoundException($"{source}: no tensor named '{name}'");
        SafetensorsFile file;
        lock (gate)
        {
            ObjectDisposedException.ThrowIf(disposed, this);
            if (!opened.TryGetValue(shard, out file!))
                opened[shard] = file = SafetensorsFile.Open(Path.Combine(folder, shard));
        }
        if (!file.Contains(name))
            throw new SafetensorsFormatException(source, name,
                $"the index puts this tensor in shard '{shard}', but {file.Path} has no tensor of that name; the index and shards come from different saves: re-download or re-save the checkpoint");
        return file;
    }
}
