namespace LoRAHub.Safetensors;

/// <summary>
/// The element types LoRAHub reads and writes. The names are the safetensors dtype codes; the spec defines a few more
/// (U16, U32, U64, the 8/6/4-bit floats, C64) that LoRAHub rejects with a clear message.
/// </summary>
public enum SafetensorsDType
{
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    BOOL,
}
