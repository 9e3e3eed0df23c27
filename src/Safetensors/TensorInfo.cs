namespace LoRAHub.Safetensors;

/// <summary>
/// One tensor's header entry. <see cref="Begin"/> and <see cref="End"/> are the header's data_offsets: byte offsets
/// RELATIVE to the start of the data section (the byte after the header), not to the start of the file. Add
/// <see cref="SafetensorsFile.DataStart"/> for a file offset.
/// </summary>
public sealed record TensorInfo(string Name, SafetensorsDType DType, long[] Shape, long Begin, long End)
{
    /// <summary>The product of the dimensions; 1 for a scalar (shape []), 0 when any dimension is 0.</summary>
    public long ElementCount
    {
        get
        {
            long count = 1;
            foreach (var dim in Shape) count = checked(count * dim);
            return count;
        }
    }

    /// <summary>The tensor's size in bytes (End - Begin).</summary>
    public long ByteLength => End - Begin;
}
