using System.Text;
using System.Text.Json;

namespace LoRAHub.Safetensors;

/// <summary>A tensor to write: its header fields and a callback that writes exactly ByteLength bytes.</summary>
public sealed record SafetensorsEntry(string Name, SafetensorsDType DType, long[] Shape, long ByteLength, Action<Stream> WriteData)
{
    public static SafetensorsEntry FromBytes(string name, SafetensorsDType dtype, long[] shape, byte[] data) =>
        new(name, dtype, shape, data.LongLength, s => s.Write(data));
}

/// <summary>Writes safetensors files atomically: a temp file in the same folder, flushed, then renamed over the target.</summary>
public static class SafetensorsWriter
{
    public static void Write(string path, IEnumerable<SafetensorsEntry> entries, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var list = entries.ToList();
        var names = new HashSet<string>();
        long offset = 0;
        var layout = new List<(string, SafetensorsDType, long[], long, long)>();
        foreach (var e in list)
        {
            if (!names.Add(e.Name)) throw new ArgumentException($"duplicate tensor name '{e.Name}'");
            var expected = e.Shape.Aggregate(1L, (a, b) => a * b) * SafetensorsDTypes.ElementSize(e.DType);
            if (expected != e.ByteLength) throw new ArgumentException($"tensor '{e.Name}': shape [{string.Join(", ", e.Shape)}] of {e.DType} needs {expected} bytes, not {e.ByteLength}");
            layout.Add((e.Name, e.DType, e.Shape, offset, offset + e.ByteLength));
            offset += e.ByteLength;
        }
        var header = Encoding.UTF8.GetBytes(SafetensorsFile.HeaderJson(layout, metadata));
        var padded = (header.Length + 7) / 8 * 8; // the spec aligns the data section to 8 bytes

        var full = Path.GetFullPath(path);
        Directory.CreateDirectory(Path.GetDirectoryName(full)!);
        var temp = full + ".tmp-" + Guid.NewGuid().ToString("N")[..8];
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                Span<byte> len = stackalloc byte[8];
                BitConverter.TryWriteBytes(len, (ulong)padded);
                stream.Write(len);
                stream.Write(header);
                for (var i = header.Length; i < padded; i++) stream.WriteByte((byte)' ');
                foreach (var e in list)
                {
                    var before = stream.Position;
                    e.WriteData(stream);
                    if (stream.Position - before != e.ByteLength)
                        throw new InvalidOperationException($"tensor '{e.Name}': the writer produced {stream.Position - before} bytes, expected {e.ByteLength}");
                }
                stream.Flush(flushToDisk: true);
            }
            File.Move(temp, full, overwrite: true);
        }
        catch
        {
            if (File.Exists(temp)) File.Delete(temp);
            throw;
        }
    }

    /// <summary>
    /// Writes `model-0000K-of-0000N.safetensors` shards of at most maxShardBytes (a larger tensor gets its own shard)
    /// plus `model.safetensors.index.json`, as transformers names them. One shard is written as `model.safetensors`.
    /// </summary>
    public static void WriteSharded(string folder, IEnumerable<SafetensorsEntry> entries, long maxShardBytes, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var shards = new List<List<SafetensorsEntry>> { new() };
        long size = 0, total = 0;
        foreach (var e in entries)
        {
            if (size > 0 && size + e.ByteLength > maxShardBytes)
            {
                shards.Add([]);
                size = 0;
            }
            shards[^1].Add(e);
            size += e.ByteLength;
            total += e.ByteLength;
        }
        Directory.CreateDirectory(folder);
        if (shards.Count == 1)
        {
            Write(Path.Combine(folder, "model.safetensors"), shards[0], metadata ?? new Dictionary<string, string> { ["format"] = "pt" });
            return;
        }
        var weightMap = new SortedDictionary<string, string>(StringComparer.Ordinal);
        for (var i = 0; i < shards.Count; i++)
        {
            var file = $"model-{i + 1:D5}-of-{shards.Count:D5}.safetensors";
            Write(Path.Combine(folder, file), shards[i], metadata ?? new Dictionary<string, string> { ["format"] = "pt" });
            foreach (var e in shards[i]) weightMap[e.Name] = file;
        }
        var index = JsonSerializer.Serialize(new { metadata = new { total_size = total }, weight_map = weightMap }, new JsonSerializerOptions { WriteIndented = true });
        var indexPath = Path.Combine(folder, ShardedSafetensors.IndexFile);
        File.WriteAllText(indexPath + ".tmp", index);
        File.Move(indexPath + ".tmp", indexPath, overwrite: true);
    }
}
