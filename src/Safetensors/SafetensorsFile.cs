using System.IO.MemoryMappedFiles;
using System.Text;
using System.Text.Json;

namespace LoRAHub.Safetensors;

/// <summary>
/// A memory-mapped safetensors file. The header is validated completely on open (offsets, sizes, dtypes, overlaps,
/// holes), so reading a tensor never goes out of bounds.
/// </summary>
public sealed unsafe class SafetensorsFile : IDisposable
{
    private const long MaxHeaderBytes = 100L << 20;
    private readonly MemoryMappedFile? map;
    private readonly MemoryMappedViewAccessor? view;
    private readonly byte* basePointer;
    private readonly long dataStart;
    private readonly Dictionary<string, TensorInfo> byName;
    private bool disposed;

    private SafetensorsFile(string path, MemoryMappedFile? map, MemoryMappedViewAccessor? view, byte* basePointer, long dataStart,
        List<TensorInfo> tensors, Dictionary<string, string> metadata)
    {
        Path = path;
        this.map = map;
        this.view = view;
        this.basePointer = basePointer;
        this.dataStart = dataStart;
        Tensors = tensors;
        Metadata = metadata;
        byName = tensors.ToDictionary(t => t.Name);
    }

    public string Path { get; }
    public IReadOnlyList<TensorInfo> Tensors { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }

    public TensorInfo this[string name] => byName.TryGetValue(name, out var t) ? t
        : throw new KeyNotFoundException($"{Path}: no tensor named '{name}'");

    public bool TryGet(string name, out TensorInfo info) => byName.TryGetValue(name, out info!);
    public bool Contains(string name) => byName.ContainsKey(name);

    public static SafetensorsFile Open(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"safetensors file not found: {path}", path);
        var length = new FileInfo(path).Length;
        string Fail(string what) => throw new SafetensorsFormatException($"{path}: {what}");
        if (length < 8) Fail($"the file has {length} bytes, fewer than the 8-byte header length; it is truncated or not a safetensors file");

        MemoryMappedFile? map = null;
        MemoryMappedViewAccessor? view = null;
        byte* ptr = null;
        try
        {
            map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
            view = map.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref ptr);
            ptr += view.PointerOffset;
            var headerLength = *(ulong*)ptr;
            if (headerLength > (ulong)Math.Min(MaxHeaderBytes, length - 8))
                Fail($"the header claims {headerLength} bytes but the file has {length - 8} after the length field; it is truncated or corrupt — re-download or re-save it");
            var header = new ReadOnlySpan<byte>(ptr + 8, (int)headerLength);
            var (tensors, metadata) = ParseHeader(path, header, length - 8 - (long)headerLength);
            return new SafetensorsFile(path, map, view, ptr, 8 + (long)headerLength, tensors, metadata);
        }
        catch
        {
            if (ptr != null) view!.SafeMemoryMappedViewHandle.ReleasePointer();
            view?.Dispose();
            map?.Dispose();
            throw;
        }
    }

    internal static (List<TensorInfo>, Dictionary<string, string>) ParseHeader(string path, ReadOnlySpan<byte> header, long dataLength)
    {
        string Fail(string what) => throw new SafetensorsFormatException($"{path}: {what}");
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(header.ToArray().AsMemory().TrimEnd((byte)' '));
        }
        catch (JsonException e)
        {
            throw new SafetensorsFormatException($"{path}: the header is not valid JSON ({e.Message}); the file is corrupt");
        }
        using var _ = doc;
        if (doc.RootElement.ValueKind != JsonValueKind.Object) Fail("the header is not a JSON object");

        var tensors = new List<TensorInfo>();
        var metadata = new Dictionary<string, string>();
        var seen = new HashSet<string>();
        foreach (var entry in doc.RootElement.EnumerateObject())
        {
            if (!seen.Add(entry.Name)) Fail($"tensor '{entry.Name}' appears twice in the header");
            if (entry.Name == "__metadata__")
            {
                if (entry.Value.ValueKind != JsonValueKind.Object) Fail("__metadata__ must be an object of strings");
                foreach (var m in entry.Value.EnumerateObject())
                    metadata[m.Name] = m.Value.ValueKind == JsonValueKind.String ? m.Value.GetString()! : Fail($"__metadata__ value '{m.Name}' is not a string");
                continue;
            }
            tensors.Add(ParseEntry(path, entry.Name, entry.Value, dataLength));
        }

        // Tensors must tile the data section exactly: no overlaps, no holes.
        long expected = 0;
        foreach (var t in tensors.OrderBy(t => t.Begin).ThenBy(t => t.End))
        {
            if (t.Begin < expected) Fail($"tensor '{t.Name}' (bytes {t.Begin}..{t.End}) overlaps the tensor before it");
            if (t.Begin > expected) Fail($"there is a hole of {t.Begin - expected} bytes before tensor '{t.Name}'");
            expected = t.End;
        }
        if (expected != dataLength)
            Fail(expected < dataLength
                ? $"{dataLength - expected} bytes after the last tensor are not described by the header"
                : $"the data section has {dataLength} bytes but the header needs {expected}; the file is truncated");
        return (tensors, metadata);
    }

    private static TensorInfo ParseEntry(string path, string name, JsonElement e, long dataLength)
    {
        string Fail(string what) => throw new SafetensorsFormatException($"{path}: tensor '{name}': {what}");
        if (e.ValueKind != JsonValueKind.Object) Fail("entry is not an object");
        if (!e.TryGetProperty("dtype", out var d) || d.ValueKind != JsonValueKind.String) Fail("missing or non-string 'dtype'");
        if (!SafetensorsDTypes.TryParse(d.GetString()!, out var dtype))
            Fail($"unknown dtype '{d.GetString()}' (LoRAHub reads {string.Join(", ", Enum.GetNames<SafetensorsDType>())})");
        if (!e.TryGetProperty("shape", out var s) || s.ValueKind != JsonValueKind.Array) Fail("missing or non-array 'shape'");
        var shape = new List<long>();
        long count = 1;
        foreach (var dim in s.EnumerateArray())
        {
            if (dim.ValueKind != JsonValueKind.Number || !dim.TryGetInt64(out var v) || v < 0) Fail($"shape has an invalid dimension {dim}");
            shape.Add(v);
            try { count = checked(count * v); }
            catch (OverflowException) { Fail("the shape's element count overflows"); }
        }
        if (!e.TryGetProperty("data_offsets", out var o) || o.ValueKind != JsonValueKind.Array || o.GetArrayLength() != 2) Fail("'data_offsets' must be [begin, end]");
        if (!o[0].TryGetInt64(out var begin) || !o[1].TryGetInt64(out var end) || begin < 0 || end < begin)
            Fail($"invalid data_offsets {o}");
        if (end > dataLength) Fail($"data ends at byte {end} but the data section has only {dataLength} bytes; the file is truncated — re-download or re-save it");
        long bytes;
        try { bytes = checked(count * SafetensorsDTypes.ElementSize(dtype)); }
        catch (OverflowException) { bytes = -1; }
        if (bytes != end - begin) Fail($"shape [{string.Join(", ", shape)}] of {dtype} needs {bytes} bytes but data_offsets give {end - begin}");
        return new TensorInfo(name, dtype, shape.ToArray(), begin, end);
    }

    /// <summary>The tensor's bytes in the mapped file; valid until this object is disposed.</summary>
    public ReadOnlySpan<byte> GetBytes(string name)
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        var t = this[name];
        if (t.ByteLength > int.MaxValue)
            throw new NotSupportedException($"{Path}: tensor '{name}' has {t.ByteLength} bytes; spans are limited to 2 GiB — use GetPointer");
        return new ReadOnlySpan<byte>(basePointer + dataStart + t.Begin, (int)t.ByteLength);
    }

    /// <summary>A pointer to the tensor's bytes (for tensors over 2 GiB); valid until dispose.</summary>
    public byte* GetPointer(string name)
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        return basePointer + dataStart + this[name].Begin;
    }

    public byte[] ReadBytes(string name) => GetBytes(name).ToArray();

    public void Dispose()
    {
        if (disposed) return;
        disposed = true;
        view?.SafeMemoryMappedViewHandle.ReleasePointer();
        view?.Dispose();
        map?.Dispose();
    }

    internal static string HeaderJson(IEnumerable<(string name, SafetensorsDType dtype, long[] shape, long begin, long end)> tensors, IReadOnlyDictionary<string, string>? metadata)
    {
        using var ms = new MemoryStream();
        using (var w = new Utf8JsonWriter(ms))
        {
            w.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                w.WriteStartObject("__metadata__");
                foreach (var (k, v) in metadata) w.WriteString(k, v);
                w.WriteEndObject();
            }
            foreach (var (name, dtype, shape, begin, end) in tensors)
            {
                w.WriteStartObject(name);
                w.WriteString("dtype", SafetensorsDTypes.ToCode(dtype));
                w.WriteStartArray("shape");
                foreach (var s in shape) w.WriteNumberValue(s);
                w.WriteEndArray();
                w.WriteStartArray("data_offsets");
                w.WriteNumberValue(begin);
                w.WriteNumberValue(end);
                w.WriteEndArray();
                w.WriteEndObject();
            }
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(ms.ToArray());
    }
}
