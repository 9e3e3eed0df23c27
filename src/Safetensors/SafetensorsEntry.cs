namespace LoRAHub.Safetensors;

/// <summary>
/// A tensor to write: its header fields and a callback that writes exactly <paramref name="ByteLength"/> bytes of
/// little-endian, row-major data to the stream it is given. The callback runs once, while the file is being written,
/// so large tensors can be streamed from wherever they live without first being gathered in memory.
/// </summary>
public sealed record SafetensorsEntry(string Name, SafetensorsDType DType, long[] Shape, long ByteLength, Action<Stream> WriteData)
{
    /// <summary>An entry whose data is already in a byte array (the array is not copied).</summary>
    public static SafetensorsEntry FromBytes(string name, SafetensorsDType dtype, long[] shape, byte[] data)
    {
        ArgumentNullException.ThrowIfNull(data);
        return new SafetensorsEntry(name, dtype, shape, data.LongLength, stream => stream.Write(data));
    }
}
