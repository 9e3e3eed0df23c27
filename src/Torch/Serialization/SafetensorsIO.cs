using LoRAHub.Safetensors;

namespace LoRAHub.Torch;

public static partial class torch
{
    /// <summary>Writes tensors to a safetensors file atomically (temp file + rename).</summary>
    public static void save_safetensors(IReadOnlyDictionary<string, Tensor> tensors, string path, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var entries = tensors.Select(kv =>
        {
            var t = kv.Value;
            var bytes = t.numel() * t.element_size();
            return new SafetensorsEntry(kv.Key, SafetensorsTypes.ToFile(t.dtype), t.shape, bytes, stream =>
            {
                // One tensor at a time through host memory keeps peak memory at the largest tensor.
                var buffer = new byte[bytes];
                t.CopyTo(buffer);
                stream.Write(buffer);
            });
        });
        SafetensorsWriter.Write(path, entries, metadata);
    }

    /// <summary>Reads every tensor of a safetensors file (or sharded folder) onto a device.</summary>
    public static Dictionary<string, Tensor> load_safetensors(string path, Device? device = null)
    {
        using var file = ShardedSafetensors.Open(path);
        var result = new Dictionary<string, Tensor>();
        foreach (var name in file.Names)
        {
            var info = file.Info(name);
            result[name] = frombuffer(file.GetBytes(name), info.Shape, SafetensorsTypes.ToTorch(info.DType, path, name), device);
        }
        return result;
    }
}

/// <summary>Maps between safetensors dtype codes and libtorch scalar types.</summary>
public static class SafetensorsTypes
{
    public static SafetensorsDType ToFile(ScalarType t) => t switch
    {
        ScalarType.Float32 => SafetensorsDType.F32,
        ScalarType.BFloat16 => SafetensorsDType.BF16,
        ScalarType.Float16 => SafetensorsDType.F16,
        ScalarType.Float64 => SafetensorsDType.F64,
        ScalarType.Int64 => SafetensorsDType.I64,
        ScalarType.Int32 => SafetensorsDType.I32,
        ScalarType.Int16 => SafetensorsDType.I16,
        ScalarType.Int8 => SafetensorsDType.I8,
        ScalarType.Byte => SafetensorsDType.U8,
        ScalarType.Bool => SafetensorsDType.BOOL,
        _ => throw new NotSupportedException($"{t} cannot be stored in safetensors"),
    };

    public static ScalarType ToTorch(SafetensorsDType t, string file = "", string tensor = "") => t switch
    {
        SafetensorsDType.F32 => ScalarType.Float32,
        SafetensorsDType.BF16 => ScalarType.BFloat16,
        SafetensorsDType.F16 => ScalarType.Float16,
        SafetensorsDType.F64 => ScalarType.Float64,
        SafetensorsDType.I64 => ScalarType.Int64,
        SafetensorsDType.I32 => ScalarType.Int32,
        SafetensorsDType.I16 => ScalarType.Int16,
        SafetensorsDType.I8 => ScalarType.Int8,
        SafetensorsDType.U8 => ScalarType.Byte,
        SafetensorsDType.BOOL => ScalarType.Bool,
        _ => throw new NotSupportedException($"{file}: tensor '{tensor}' has dtype {t}, which LoRAHub cannot load"),
    };
}
