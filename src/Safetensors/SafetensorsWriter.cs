using System.Buffers.Binary;

namespace LoRAHub.Safetensors;

/// <summary>Writes safetensors files atomically (temporary file, flush to disk, rename over the target).</summary>
public static partial class SafetensorsWriter
{
    /// <summary>
    /// Writes the entries, in the given order and contiguous, to <paramref name="path"/>. Either the complete new file
    /// replaces the old one, or (on any exception, including one thrown by a WriteData callback) the old file is left
    /// byte-identical and no temporary file remains.
    /// </summary>
    /// <exception cref="ArgumentException">An entry is invalid (duplicate or reserved name, negative dimension, or a
    /// ByteLength that does not match its shape and dtype); nothing is written.</exception>
    /// <exception cref="InvalidOperationException">A callback wrote more or fewer bytes than its ByteLength.</exception>
    public static void Write(string path, IEnumerable<SafetensorsEntry> entries, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var list = Validate(entries, metadata);
        var layout = Layout(list);
        var header = HeaderBuilder.Build(layout, metadata);
        if (header.Length > HeaderParser.MaxHeaderBytes)
            throw new ArgumentException(
                $"the header would be {header.Length} bytes, more than the {HeaderParser.MaxHeaderBytes} that readers accept; split the tensors over several files",
                nameof(entries));

        AtomicFile.Write(path, stream =>
        {
            Span<byte> prefix = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)header.Length);
            stream.Write(prefix);
            stream.Write(header);
            foreach (var entry in list)
            {
                var guarded = new ExactLengthStream(stream, entry.Name, entry.ByteLength);
                entry.WriteData(guarded);
                guarded.Finish();
            }
        });
    }

    /// <summary>Checks everything that can be checked before the file is created, so bad input never costs a write.</summary>
    private static List<SafetensorsEntry> Validate(IEnumerable<SafetensorsEntry> entries, IReadOnlyDictionary<string, string>? metadata)
    {
        ArgumentNullException.ThrowIfNull(entries);
        var list = entries.ToList();
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var entry in list)
        {
            if (entry is null) throw new ArgumentException("an entry is null", nameof(entries));
            if (entry.Name is null) throw new ArgumentException("an entry has a null name", nameof(entries));
            if (entry.Name == HeaderParser.MetadataKey)
                throw new ArgumentException($"'{HeaderParser.MetadataKey}' is reserved for metadata and cannot name a tensor", nameof(entries));
            if (!names.Add(entry.Name)) throw new ArgumentException($"tensor '{entry.Name}' appears more than once", nameof(entries));
            if (entry.Shape is null) throw new ArgumentException($"tensor '{entry.Name}': Shape is null", nameof(entries));
            if (entry.WriteData is null) throw new ArgumentException($"tensor '{entry.Name}': WriteData is null", nameof(entries));
            var expected = ExpectedBytes(entry);
            if (expected != entry.ByteLength)
                throw new ArgumentException(
                    $"tensor '{entry.Name}': shape [{string.Join(", ", entry.Shape)}] of {SafetensorsDTypes.ToCode(entry.DType)} needs {expected} bytes, but ByteLength is {entry.ByteLength}",
                    nameof(entries));
        }
        if (metadata is not null)
            foreach (var (key, value) in metadata)
                if (key is null || value is null)
                    throw new ArgumentException("metadata keys and values must not be null", nameof(metadata));
        return list;
    }

    private static long ExpectedBytes(SafetensorsEntry entry)
    {
        try
        {
            long bytes = SafetensorsDTypes.ElementSize(entry.DType);
            foreach (var dim in entry.Shape)
            {
                if (dim < 0) throw new ArgumentException($"tensor '{entry.Name}': dimension {dim} is negative", nameof(entry));
                bytes = checked(bytes * dim);
            }
            return bytes;
        }
        catch (OverflowException)
        {
            throw new ArgumentException($"tensor '{entry.Name}': the size of shape [{string.Join(", ", entry.Shape)}] overflows a 64-bit integer", nameof(entry));
        }
    }

    /// <summary>Assigns contiguous data offsets in entry order.</summary>
    private static List<TensorInfo> Layout(List<SafetensorsEntry> entries)
    {
        var layout = new List<TensorInfo>(entries.Count);
        long offset = 0;
        foreach (var entry in entries)
        {
            var end = checked(offset + entry.ByteLength);
            layout.Add(new TensorInfo(entry.Name, entry.DType, entry.Shape, offset, end));
            offset = end;
        }
        return layout;
    }
}
