using LoRAHub.Safetensors;
using LoRAHub.Torch;

namespace LoRAHub.Plugins.LoRA;

/// <summary>
/// adapter_model.safetensors I/O. The dtype mapping is local because this plugin carries a private copy of the
/// Safetensors assembly: its types must not cross into the host's Torch assembly.
/// </summary>
internal static class AdapterWeightsFile
{
    public const string FileName = "adapter_model.safetensors";

    /// <summary>Writes the tensors atomically (temp file + rename), in their own dtypes.</summary>
    public static void Write(string path, IReadOnlyDictionary<string, Tensor> tensors)
    {
        var entries = tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv =>
        {
            var t = kv.Value;
            var bytes = t.numel() * t.element_size();
            return new SafetensorsEntry(kv.Key, ToFile(t.dtype), t.shape, bytes, stream =>
            {
                var buffer = new byte[bytes];
                t.CopyTo(buffer);
                stream.Write(buffer);
            });
        });
        SafetensorsWriter.Write(path, entries, new Dictionary<string, string> { ["format"] = "pt" });
    }

    /// <summary>Every tensor of the file, on the device.</summary>
    public static Dictionary<string, Tensor> Read(string path, Device device)
    {
        using var file = SafetensorsFile.Open(path);
        var result = new Dictionary<string, Tensor>();
        foreach (var info in file.Tensors)
            result[info.Name] = torch.frombuffer(file.GetBytes(info.Name), info.Shape, ToTorch(info.DType, path, info.Name), device);
        return result;
    }

    private static SafetensorsDType ToFile(ScalarType t) => t switch
    {
        ScalarType.Float32 => SafetensorsDType.F32,
        ScalarType.BFloat16 => SafetensorsDType.BF16,
        ScalarType.Float16 => SafetensorsDType.F16,
        ScalarType.Float64 => SafetensorsDType.F64,
        _ => throw new NotSupportedException($"LoRA weights of dtype {t.ToTorchName()} cannot be saved"),
    };

    private static ScalarType ToTorch(SafetensorsDType t, string path, string name) => t switch
    {
        SafetensorsDType.F32 => ScalarType.Float32,
        SafetensorsDType.BF16 => ScalarType.BFloat16,
        SafetensorsDType.F16 => ScalarType.Float16,
        SafetensorsDType.F64 => ScalarType.Float64,
        _ => throw new InvalidDataException($"{path}: tensor '{name}' has dtype {t}; LoRA weights are floating point"),
    };
}
