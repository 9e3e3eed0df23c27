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

    /// <summary>
    /// Copies the tensors of a safetensors file into <paramref name="targets"/> by key (load_state_dict for a flat dict):
    /// every target must be in the file with its shape; the file may hold more. Throws InvalidDataException naming the key.
    /// </summary>
    public static void load_safetensors_into(IReadOnlyDictionary<string, Tensor> targets, string path)
    {
        var device = targets.Values.FirstOrDefault()?.device;
        var loaded = load_safetensors(path, device);
        try
        {
            using var _ = no_grad();
            foreach (var (key, target) in targets)
            {
                if (!loaded.TryGetValue(key, out var t)) throw new InvalidDataException($"{path} lacks '{key}'");
                if (!t.shape.SequenceEqual(target.shape))
                    throw new InvalidDataException($"'{key}' in {path} has shape [{string.Join(", ", t.shape)}]; the model needs [{string.Join(", ", target.shape)}]");
                target.copy_(t);
            }
        }
        finally
        {
            foreach (var t in loaded.Values) t.Dispose();
        }
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
