namespace LoRAHub.Safetensors;

/// <summary>One tensor's header entry. Begin/End are byte offsets relative to the start of the data section.</summary>
public sealed record TensorInfo(string Name, SafetensorsDType DType, long[] Shape, long Begin, long End)
{
    public long ElementCount => Shape.Aggregate(1L, (a, b) => a * b);
    public long ByteLength => End - Begin;
}

/// <summary>A malformed safetensors file or index; the message names the file, the tensor and the fix.</summary>
public sealed class SafetensorsFormatException(string message) : Exception(message);
