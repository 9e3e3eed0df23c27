namespace LoRAHub.Safetensors;

/// <summary>
/// The write-only stream handed to a <see cref="SafetensorsEntry.WriteData"/> callback. It stops the callback from
/// writing past its tensor (which would shift every later tensor), from seeking back over the header, and from closing
/// the file; after the callback, <see cref="Finish"/> checks that it wrote everything it declared.
/// </summary>
internal sealed class ExactLengthStream(Stream inner, string tensorName, long expected) : Stream
{
    private long written;

    public override bool CanRead => false;
    public override bool CanSeek => false;
    public override bool CanWrite => true;
    public override long Length => throw new NotSupportedException();

    public override long Position
    {
        get => written;
        set => throw new NotSupportedException();
    }

    public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

    public override void Write(ReadOnlySpan<byte> buffer)
    {
        if (buffer.Length > expected - written)
            throw new InvalidOperationException(
                $"tensor '{tensorName}': the WriteData callback wrote more than the {expected} bytes its entry declares (ByteLength)");
        inner.Write(buffer);
        written += buffer.Length;
    }

    public override void WriteByte(byte value) => Write([value]);

    /// <summary>Throws if the callback wrote fewer bytes than declared.</summary>
    public void Finish()
    {
        if (written != expected)
            throw new InvalidOperationException(
                $"tensor '{tensorName}': the WriteData callback wrote {written} bytes, but the entry declares {expected} (ByteLength)");
    }

    // The file belongs to the writer: a callback that disposes or flushes its stream must not close or sync it.
    public override void Flush()
    {
    }

    protected override void Dispose(bool disposing)
    {
    }

    public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();
}
