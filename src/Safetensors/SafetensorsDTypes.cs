namespace LoRAHub.Safetensors;

/// <summary>Conversions between <see cref="SafetensorsDType"/> and the dtype codes written in the header.</summary>
public static class SafetensorsDTypes
{
    /// <summary>Every supported dtype, in declaration order.</summary>
    public static IReadOnlyList<SafetensorsDType> All { get; } = Array.AsReadOnly(Enum.GetValues<SafetensorsDType>());

    /// <summary>The supported codes as one comma-separated string, for error messages.</summary>
    public static string KnownCodes { get; } = string.Join(", ", All.Select(ToCode));

    // Codes the spec defines but LoRAHub has no tensor type for; naming them separately tells the user the file is
    // fine and only needs converting, rather than corrupt.
    private static readonly HashSet<string> OtherSpecCodes =
        ["U16", "U32", "U64", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"];

    /// <summary>Parses a header dtype code. Codes are case-sensitive, as in the spec.</summary>
    public static bool TryParse(string? code, out SafetensorsDType dtype)
    {
        // An explicit table rather than Enum.TryParse, which would also accept "f32", "1" or " F32".
        switch (code)
        {
            case "F64": dtype = SafetensorsDType.F64; return true;
            case "F32": dtype = SafetensorsDType.F32; return true;
            case "F16": dtype = SafetensorsDType.F16; return true;
            case "BF16": dtype = SafetensorsDType.BF16; return true;
            case "I64": dtype = SafetensorsDType.I64; return true;
            case "I32": dtype = SafetensorsDType.I32; return true;
            case "I16": dtype = SafetensorsDType.I16; return true;
            case "I8": dtype = SafetensorsDType.I8; return true;
            case "U8": dtype = SafetensorsDType.U8; return true;
            case "BOOL": dtype = SafetensorsDType.BOOL; return true;
            default: dtype = default; return false;
        }
    }

    /// <summary>Parses a header dtype code, or throws a <see cref="FormatException"/> that lists the known codes.</summary>
    public static SafetensorsDType Parse(string code) =>
        TryParse(code, out var dtype) ? dtype : throw new FormatException(DescribeUnknown(code));

    /// <summary>The code written in the header for this dtype.</summary>
    public static string ToCode(SafetensorsDType dtype) => dtype switch
    {
        SafetensorsDType.F64 => "F64",
        SafetensorsDType.F32 => "F32",
        SafetensorsDType.F16 => "F16",
        SafetensorsDType.BF16 => "BF16",
        SafetensorsDType.I64 => "I64",
        SafetensorsDType.I32 => "I32",
        SafetensorsDType.I16 => "I16",
        SafetensorsDType.I8 => "I8",
        SafetensorsDType.U8 => "U8",
        SafetensorsDType.BOOL => "BOOL",
        _ => throw Undefined(dtype),
    };

    /// <summary>Bytes per element.</summary>
    public static int ElementSize(SafetensorsDType dtype) => dtype switch
    {
        SafetensorsDType.F64 or SafetensorsDType.I64 => 8,
        SafetensorsDType.F32 or SafetensorsDType.I32 => 4,
        SafetensorsDType.F16 or SafetensorsDType.BF16 or SafetensorsDType.I16 => 2,
        SafetensorsDType.I8 or SafetensorsDType.U8 or SafetensorsDType.BOOL => 1,
        _ => throw Undefined(dtype),
    };

    /// <summary>Explains why a code was not accepted: valid in the spec but unsupported here, or not a dtype at all.</summary>
    internal static string DescribeUnknown(string? code) => code is not null && OtherSpecCodes.Contains(code)
        ? $"dtype '{code}' is valid safetensors but LoRAHub does not support it (supported: {KnownCodes}); convert the tensor to one of these"
        : $"unknown dtype '{code}' (known: {KnownCodes})";

    private static ArgumentOutOfRangeException Undefined(SafetensorsDType dtype) =>
        new(nameof(dtype), dtype, "not a defined SafetensorsDType value");
}
