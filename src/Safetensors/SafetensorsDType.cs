namespace LoRAHub.Safetensors;

/// <summary>The element types LoRAHub reads and writes (safetensors' dtype codes).</summary>
public enum SafetensorsDType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL }

public static class SafetensorsDTypes
{
    private static readonly Dictionary<string, SafetensorsDType> ByCode = Enum.GetValues<SafetensorsDType>().ToDictionary(d => d.ToString());

    public static bool TryParse(string code, out SafetensorsDType dtype) => ByCode.TryGetValue(code, out dtype);

    public static SafetensorsDType Parse(string code) =>
        TryParse(code, out var d) ? d : throw new FormatException($"unknown dtype '{code}' (known: {string.Join(", ", ByCode.Keys)})");

    public static string ToCode(SafetensorsDType dtype) => dtype.ToString();

    public static int ElementSize(SafetensorsDType dtype) => dtype switch
    {
        SafetensorsDType.F64 or SafetensorsDType.I64 => 8,
        SafetensorsDType.F32 or SafetensorsDType.I32 => 4,
        SafetensorsDType.F16 or SafetensorsDType.BF16 or SafetensorsDType.I16 => 2,
        _ => 1,
    };
}
