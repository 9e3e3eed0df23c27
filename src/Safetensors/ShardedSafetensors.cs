using System.Text.Json;

namespace LoRAHub.Safetensors;

/// <summary>
/// One view over a checkpoint: a single file, a folder with model.safetensors (or exactly one *.safetensors), or a
/// folder with model.safetensors.index.json naming the shard of each tensor.
/// </summary>
public sealed class ShardedSafetensors : IDisposable
{
    public const string IndexFile = "model.safetensors.index.json";
    private readonly Dictionary<string, string> shardOf;
    private readonly Dictionary<string, SafetensorsFile> open = new();
    private readonly string folder;

    private ShardedSafetensors(string folder, Dictionary<string, string> shardOf)
    {
        this.folder = folder;
        this.shardOf = shardOf;
    }

    public static ShardedSafetensors Open(string folderOrFile)
    {
        if (File.Exists(folderOrFile))
        {
            var file = SafetensorsFile.Open(folderOrFile);
            var single = new ShardedSafetensors(Path.GetDirectoryName(Path.GetFullPath(folderOrFile))!, file.Tensors.ToDictionary(t => t.Name, _ => Path.GetFileName(folderOrFile)));
            single.open[Path.GetFileName(folderOrFile)] = file;
            return single;
        }
        if (!Directory.Exists(folderOrFile)) throw new FileNotFoundException($"no safetensors file or folder at {folderOrFile}");
        var index = Path.Combine(folderOrFile, IndexFile);
        if (File.Exists(index)) return FromIndex(folderOrFile, index);
        var model = Path.Combine(folderOrFile, "model.safetensors");
        if (File.Exists(model)) return Open(model);
        var candidates = Directory.GetFiles(folderOrFile, "*.safetensors");
        return candidates.Length == 1 ? Open(candidates[0])
            : throw new FileNotFoundException(candidates.Length == 0
                ? $"{folderOrFile} has no .safetensors file (and no {IndexFile})"
                : $"{folderOrFile} has {candidates.Length} .safetensors files but no {IndexFile} saying which tensor is where");
    }

    private static ShardedSafetensors FromIndex(string folder, string index)
    {
        var map = new Dictionary<string, string>();
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(index));
            if (!doc.RootElement.TryGetProperty("weight_map", out var wm) || wm.ValueKind != JsonValueKind.Object)
                throw new SafetensorsFormatException($"{index}: no 'weight_map' object");
            foreach (var p in wm.EnumerateObject())
                map[p.Name] = p.Value.ValueKind == JsonValueKind.String ? p.Value.GetString()! : throw new SafetensorsFormatException($"{index}: shard of '{p.Name}' is not a string");
        }
        catch (JsonException e)
        {
            throw new SafetensorsFormatException($"{index}: invalid JSON ({e.Message})");
        }
        foreach (var shard in map.Values.Distinct())
            if (!File.Exists(Path.Combine(folder, shard)))
                throw new SafetensorsFormatException($"{index} names shard '{shard}' (for '{map.First(kv => kv.Value == shard).Key}'), but {Path.Combine(folder, shard)} does not exist");
        return new ShardedSafetensors(folder, map);
    }

    public IEnumerable<string> Names => shardOf.Keys;
    public bool Contains(string name) => shardOf.ContainsKey(name);

    private SafetensorsFile FileFor(string name)
    {
        if (!shardOf.TryGetValue(name, out var shard)) throw new KeyNotFoundException($"no tensor named '{name}' in {folder}");
        if (!open.TryGetValue(shard, out var file)) open[shard] = file = SafetensorsFile.Open(Path.Combine(folder, shard));
        if (!file.Contains(name)) throw new SafetensorsFormatException($"the index says '{name}' is in {shard}, but that file has no such tensor");
        return file;
    }

    public TensorInfo Info(string name) => FileFor(name)[name];
    public ReadOnlySpan<byte> GetBytes(string name) => FileFor(name).GetBytes(name);

    public void Dispose()
    {
        foreach (var f in open.Values) f.Dispose();
        open.Clear();
    }
}
