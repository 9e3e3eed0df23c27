namespace LoRAHub.Torch;

/// <summary>Element types; the values are libtorch's c10::ScalarType codes (as in TorchSharp).</summary>
public enum ScalarType : sbyte
{
    Byte = 0,
    Int8 = 1,
    Int16 = 2,
    Int32 = 3,
    Int64 = 4,
    Float16 = 5,
    Float32 = 6,
    Float64 = 7,
    Bool = 11,
    BFloat16 = 15,
}

public static class ScalarTypeExtensions
{
    public static int ElementSize(this ScalarType t) => t switch
    {
        ScalarType.Byte or ScalarType.Int8 or ScalarType.Bool => 1,
        ScalarType.Int16 or ScalarType.Float16 or ScalarType.BFloat16 => 2,
        ScalarType.Int32 or ScalarType.Float32 => 4,
        ScalarType.Int64 or ScalarType.Float64 => 8,
        _ => throw new ArgumentOutOfRangeException(nameof(t), t, "unknown scalar type"),
    };

    public static bool IsFloatingPoint(this ScalarType t) =>
        t is ScalarType.Float16 or ScalarType.Float32 or ScalarType.Float64 or ScalarType.BFloat16;

    public static bool IsIntegral(this ScalarType t) => !t.IsFloatingPoint();

    /// <summary>PyTorch's spelling: float32, bfloat16, int64, ...</summary>
    public static string ToTorchName(this ScalarType t) => t switch
    {
        ScalarType.Byte => "uint8",
        ScalarType.Int8 => "int8",
        ScalarType.Int16 => "int16",
        ScalarType.Int32 => "int32",
        ScalarType.Int64 => "int64",
        ScalarType.Float16 => "float16",
        ScalarType.Float32 => "float32",
        ScalarType.Float64 => "float64",
        ScalarType.Bool => "bool",
        ScalarType.BFloat16 => "bfloat16",
        _ => t.ToString(),
    };

    /// <summary>Parses PyTorch and transformers spellings ("bf16", "bfloat16", "torch.float16", "fp32", ...).</summary>
    public static ScalarType ParseTorchName(string name) => name.Trim().ToLowerInvariant().Replace("torch.", "") switch
    {
        "float32" or "float" or "fp32" or "f32" => ScalarType.Float32,
        "bfloat16" or "bf16" => ScalarType.BFloat16,
        "float16" or "half" or "fp16" or "f16" => ScalarType.Float16,
        "float64" or "double" or "fp64" => ScalarType.Float64,
        "int64" or "long" => ScalarType.Int64,
        "int32" or "int" => ScalarType.Int32,
        "int16" or "short" => ScalarType.Int16,
        "int8" => ScalarType.Int8,
        "uint8" or "byte" => ScalarType.Byte,
        "bool" => ScalarType.Bool,
        _ => throw new ArgumentException($"unknown dtype '{name}'; use float32, bfloat16, float16, float64, int64, int32, int16, int8, uint8 or bool"),
    };
}
