using System.Text.Json;
using LoRAHub.Safetensors;
using LoRAHub.TorchExtensions;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Models;

/// <summary>
/// Reads a checkpoint folder (model.safetensors or shards with model.safetensors.index.json) one tensor at a time with
/// positioned file reads into a fresh host tensor, instead of through a memory map: the mapped pages of a map count toward
/// the process's resident memory until it is closed, a read copy only while it lives. So a caller that frees each tensor
/// before the next holds at most one checkpoint tensor in host memory (<see cref="PeakStagedBytes"/> says how much).
/// </summary>
public sealed class CheckpointReader : IDisposable
{
    private sealed record Entry(string Path, SafetensorsDType DType, long[] Shape, long Offset, long Bytes);

    private readonly Dictionary<string, Entry> entries = new(StringComparer.Ordinal);
    private readonly Dictionary<string, FileStream> streams = new(StringComparer.Ordinal);
    private readonly Dictionary<IntPtr, long> live = new();
    private long staged;

    private CheckpointReader(string folder)
    {
        Folder = folder;
        var index = System.IO.Path.Combine(folder, ShardedSafetensors.IndexFileName);
        IEnumerable<string> shards;
        if (File.Exists(index))
        {
            // The shared reader validates the index first (JSON, plain file names inside the folder, shards present), so a
            // damaged or hostile index is the same named error here as for PretrainedModel.Load.
            ShardedSafetensors.Open(folder).Dispose();
            using var doc = JsonDocument.Parse(File.ReadAllText(index));
            shards = doc.RootElement.GetProperty("weight_map").EnumerateObject().Select(p => p.Value.GetString()!).Distinct().ToList();
        }
        else shards = ["model.safetensors"];
        foreach (var shard in shards)
        {
            var path = System.IO.Path.Combine(folder, shard);
            if (!File.Exists(path)) throw new FileNotFoundException($"{folder}: the checkpoint file {shard} is missing", path);
            // The header only (the map is closed right away, its few touched pages with it).
            using var file = SafetensorsFile.Open(path);
            foreach (var t in file.Tensors) entries[t.Name] = new Entry(path, t.DType, t.Shape, file.DataStart + t.Begin, t.ByteLength);
        }
        Names = entries.Keys.OrderBy(k => entries[k].Path, StringComparer.Ordinal).ThenBy(k => entries[k].Offset).ToList();
        orderOf = Names.Select((n, i) => (n, i)).ToDictionary(p => p.n, p => p.i);
    }

    public static CheckpointReader Open(string folder) => new(folder);

    public string Folder { get; }

    /// <summary>Every tensor name, in file order (shard by shard, by offset), the order that reads the disk sequentially.</summary>
    public IReadOnlyList<string> Names { get; }

    public bool Contains(string name) => entries.ContainsKey(name);

    public long[] Shape(string name) => Get(name).Shape;

    public ScalarType DType(string name) => SafetensorsTypes.ToTorch(Get(name).DType, Folder, name);

    /// <summary>Position of <paramref name="name"/> in <see cref="Names"/> (for reading in file order).</summary>
    public int Order(string name) => orderOf[name];

    private readonly Dictionary<string, int> orderOf;

    /// <summary>The largest number of bytes held in host tensors handed out by <see cref="Read"/> and not yet disposed, at once.</summary>
    public long PeakStagedBytes { get; private set; }

    /// <summary>Bytes of every tensor in the checkpoint.</summary>
    public long TotalBytes => entries.Values.Sum(e => e.Bytes);

    /// <summary>
    /// The tensor (or <paramref name="count"/> elements of it from element <paramref name="elementOffset"/>, reshaped to
    /// <paramref name="shape"/>) on <paramref name="device"/> in <paramref name="dtype"/> (default: the file's): read into a host
    /// tensor, then moved and converted, the host copy freed before returning when it is not itself the result.
    /// </summary>
    public Tensor Read(string name, Device device, ScalarType? dtype = null, long elementOffset = 0, long[]? shape = null)
    {
        var e = Get(name);
        var fileType = SafetensorsTypes.ToTorch(e.DType, Folder, name);
        var count = e.Shape.Aggregate(1L, (a, b) => a * b);
        var elementBytes = count == 0 ? 1 : e.Bytes / count;
        var outShape = shape ?? e.Shape;
        var n = outShape.Aggregate(1L, (a, b) => a * b);
        if (elementOffset < 0 || elementOffset + n > count)
            throw new InvalidDataException($"{Folder}: '{name}' has {count} values; {n} from {elementOffset} were asked for");
        var host = empty(outShape, fileType, CPU);
        Track(host);
        try
        {
            var stream = Stream(e.Path);
            var span = host.bytes;
            var at = e.Offset + elementOffset * elementBytes;
            var done = 0;
            while (done < span.Length)
            {
                var read = RandomAccess.Read(stream.SafeFileHandle, span[done..], at + done);
                if (read <= 0) throw new EndOfStreamException($"{e.Path}: '{name}' ends before its {span.Length} bytes");
                done += read;
            }
            var type = dtype ?? fileType;
            if (device.type == DeviceType.CPU && type == fileType) return host;
            var result = host.to(type, device);
            Release(host);
            return result;
        }
        catch
        {
            Release(host);
            throw;
        }
    }

    /// <summary>Disposes a host tensor returned by <see cref="Read"/> (on the CPU) and stops counting its bytes.</summary>
    public void Release(Tensor t)
    {
        if (live.Remove(t.Handle, out var bytes)) staged -= bytes;
        t.Dispose();
    }

    /// <summary>Stops counting a tensor from <see cref="Read"/> that the caller keeps as part of the model (it is no longer staging).</summary>
    public Tensor Keep(Tensor t)
    {
        if (live.Remove(t.Handle, out var bytes)) staged -= bytes;
        return t;
    }

    private void Track(Tensor host)
    {
        var bytes = host.numel() * host.element_size();
        live[host.Handle] = bytes;
        staged += bytes;
        PeakStagedBytes = Math.Max(PeakStagedBytes, staged);
    }

    private Entry Get(string name) => entries.TryGetValue(name, out var e) ? e
        : throw new KeyNotFoundException($"{Folder}: the checkpoint has no tensor '{name}'");

    private FileStream Stream(string path)
    {
        if (!streams.TryGetValue(path, out var s))
            streams[path] = s = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1, FileOptions.RandomAccess);
        return s;
    }

    public void Dispose()
    {
        foreach (var s in streams.Values) s.Dispose();
        streams.Clear();
    }
}
