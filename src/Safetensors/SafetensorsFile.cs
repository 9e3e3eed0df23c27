using System.Buffers.Binary;
using System.Diagnostics.CodeAnalysis;
using System.IO.MemoryMappedFiles;

namespace LoRAHub.Safetensors;

/// <summary>
/// A read-only, memory-mapped safetensors file. <see cref="Open"/> validates the whole header (see HeaderParser), so
/// every span handed out lies inside the file. Spans stay valid until <see cref="Dispose"/>.
/// </summary>
/// <remarks>
/// The mapping follows the file's inode: replacing the file by rename (as <see cref="SafetensorsWriter"/> does) is safe
/// while it is open, but truncating it in place from another process would fault on access, as with any mapping.
/// </remarks>
public sealed unsafe class SafetensorsFile : IDisposable
{
    private readonly MemoryMappedFile map;
    private readonly MemoryMappedViewAccessor view;
    private readonly byte* data;
    private readonly Dictionary<string, TensorInfo> byName;
    private bool disposed;

    private SafetensorsFile(string path, MemoryMappedFile map, MemoryMappedViewAccessor view, byte* fileStart, long dataStart,
        List<TensorInfo> tensors, Dictionary<string, string> metadata)
    {
        Path = path;
        this.map = map;
        this.view = view;
        data = fileStart + dataStart;
        DataStart = dataStart;
        Tensors = tensors.AsReadOnly();
        Metadata = metadata.AsReadOnly();
        byName = tensors.ToDictionary(t => t.Name, StringComparer.Ordinal);
    }

    /// <summary>The path this file was opened with.</summary>
    public string Path { get; }

    /// <summary>The file offset of the data section (8 + header length); add it to a TensorInfo's Begin for a file offset.</summary>
    public long DataStart { get; }

    /// <summary>The tensors in the order the header lists them.</summary>
    public IReadOnlyList<TensorInfo> Tensors { get; }

    /// <summary>The header's __metadata__ strings; empty when there are none.</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    public TensorInfo this[string name] => byName.TryGetValue(name, out var info) ? info : throw NotFound(name);

    public bool TryGet(string name, [MaybeNullWhen(false)] out TensorInfo info) => byName.TryGetValue(name, out info);

    public bool Contains(string name) => byName.ContainsKey(name);

    /// <summary>Maps the file read-only and validates its header; throws <see cref="SafetensorsFormatException"/> if it is malformed.</summary>
    public static SafetensorsFile Open(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        // FileShare.Delete lets a writer rename a new version over this path while we hold the old one open.
        var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read | FileShare.Delete, bufferSize: 1);
        MemoryMappedFile? map = null;
        MemoryMappedViewAccessor? view = null;
        byte* pointer = null;
        try
        {
            // The length comes from the open handle, so the checks and the mapping see the same file.
            var length = stream.Length;
            var headerLength = ReadHeaderLength(path, stream, length);
            var header = new byte[headerLength];
            ReadExactly(stream, header, offset: 8);
            var dataStart = 8 + headerLength;
            var (tensors, metadata) = HeaderParser.Parse(path, header, length - dataStart);

            map = MemoryMappedFile.CreateFromFile(stream, mapName: null, capacity: 0, MemoryMappedFileAccess.Read,
                HandleInheritability.None, leaveOpen: false);
            view = map.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref pointer);
            return new SafetensorsFile(path, map, view, pointer + view.PointerOffset, dataStart, tensors, metadata);
        }
        catch
        {
            if (pointer != null) view!.SafeMemoryMappedViewHandle.ReleasePointer();
            view?.Dispose();
            map?.Dispose();
            stream.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The tensor's bytes in the mapped file (little-endian, row-major), without copying. Valid until Dispose; tensors
    /// of 2 GiB or more do not fit a span: use <see cref="GetPointer"/>.
    /// </summary>
    public ReadOnlySpan<byte> GetBytes(string name)
    {
        var info = this[name];
        if (info.ByteLength > int.MaxValue)
            throw new NotSupportedException(
                $"{Path}: tensor '{name}' has {info.ByteLength} bytes, more than a span can hold (2 GiB); use GetPointer for it");
        return new ReadOnlySpan<byte>(Start(info), (int)info.ByteLength);
    }

    /// <summary>A pointer to the tensor's first byte (ByteLength bytes follow); valid until Dispose.</summary>
    public byte* GetPointer(string name) => Start(this[name]);

    /// <summary>A copy of the tensor's bytes, independent of this object's lifetime.</summary>
    public byte[] ReadBytes(string name) => GetBytes(name).ToArray();

    public void Dispose()
    {
        if (disposed) return;
        disposed = true;
        view.SafeMemoryMappedViewHandle.ReleasePointer();
        view.Dispose();
        map.Dispose();
    }

    private byte* Start(TensorInfo info)
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        return data + info.Begin;
    }

    private KeyNotFoundException NotFound(string name)
    {
        var examples = string.Join(", ", Tensors.Take(3).Select(t => $"'{t.Name}'"));
        return new KeyNotFoundException(Tensors.Count == 0
            ? $"{Path}: no tensor named '{name}'; the file has no tensors"
            : $"{Path}: no tensor named '{name}'; the file has {Tensors.Count} tensors, such as {examples}");
    }

    private static long ReadHeaderLength(string path, FileStream stream, long fileLength)
    {
        if (fileLength < 8)
            throw new SafetensorsFormatException(path, null,
                $"the file has {fileLength} bytes, fewer than the 8-byte header length that starts every safetensors file; it is truncated or not a safetensors file; {HeaderParser.Fix}");
        Span<byte> prefix = stackalloc byte[9];
        ReadExactly(stream, prefix[..(fileLength >= 9 ? 9 : 8)], offset: 0);
        var headerLength = BinaryPrimitives.ReadUInt64LittleEndian(prefix);
        // A pickle's first bytes read as a meaningless header length: name the format instead. Only when the file is not
        // plausibly safetensors, whose length bytes can look like a pickle's start (a 1152-byte header is 80 04 00 ...).
        var plausible = headerLength <= HeaderParser.MaxHeaderBytes && (long)headerLength <= fileLength - 8 && fileLength >= 9 && prefix[8] == (byte)'{';
        if (!plausible && PickleFiles.LooksLikePickle(prefix[..8]))
            throw PickleFiles.Refuse(path, "this is a PyTorch pickle file (torch.save), not a safetensors file");
        if (headerLength > HeaderParser.MaxHeaderBytes)
            throw new SafetensorsFormatException(path, null,
                $"the header length field says {headerLength} bytes, more than the {HeaderParser.MaxHeaderBytes}-byte limit; the file is corrupt or not a safetensors file; {HeaderParser.Fix}");
        if ((long)headerLength > fileLength - 8)
            throw new SafetensorsFormatException(path, null,
                $"the file is truncated: the header length field says {headerLength} bytes but the file has only {fileLength - 8} after it; {HeaderParser.Fix}");
        return (long)headerLength;
    }

    private static void ReadExactly(FileStream stream, Span<byte> buffer, long offset)
    {
        // RandomAccess.Read may return fewer bytes than asked; a short read here means the file shrank under us.
        while (!buffer.IsEmpty)
        {
            var read = RandomAccess.Read(stream.SafeFileHandle, buffer, offset);
            if (read == 0) throw new IOException($"{stream.Name}: the file became shorter while it was being read");
            buffer = buffer[read..];
            offset += read;
        }
    }
}
