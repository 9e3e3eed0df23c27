using LoRAHub.TorchExtensions;
using static TorchSharp.torch;

namespace LoRAHub.Tuners;

/// <summary>
/// Weight files of adapter folders (adapter_model.safetensors, and model.safetensors of methods that train the base),
/// through the extensions library's validated safetensors reader and its atomic writer.
/// </summary>
public static class AdapterWeightsFile
{
    public const string FileName = "adapter_model.safetensors";

    /// <summary>
    /// Writes the tensors atomically (temp file + rename), in their own dtypes, keys sorted, with PEFT's "format": "pt"
    /// metadata. Adapter weights are floating point; <paramref name="floatingPointOnly"/> false lets a whole model's
    /// state (integer buffers included) through.
    /// </summary>
    public static void Write(string path, IReadOnlyDictionary<string, Tensor> tensors, bool floatingPointOnly = true)
    {
        if (floatingPointOnly)
            foreach (var (key, t) in tensors)
                if (!t.is_floating_point())
                    throw new NotSupportedException($"adapter weight '{key}' has dtype {t.dtype}; adapter weights are floating point");
        var sorted = tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal).ToDictionary(kv => kv.Key, kv => kv.Value);
        torchx.save_safetensors(sorted, path, new Dictionary<string, string> { ["format"] = "pt" });
    }

    /// <summary>Every tensor of the file, on the device; a tensor that is not floating point is refused (and nothing is kept).</summary>
    public static Dictionary<string, Tensor> Read(string path, Device device)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"no {Path.GetFileName(path)} in {Path.GetDirectoryName(path)}", path);
        var result = torchx.load_safetensors(path, device);
        if (result.FirstOrDefault(kv => !kv.Value.is_floating_point()) is { Key: not null } bad)
        {
            var message = $"{path}: tensor '{bad.Key}' has dtype {bad.Value.dtype}; adapter weights are floating point";
            foreach (var t in result.Values) t.Dispose();
            throw new InvalidDataException(message);
        }
        return result;
    }
}
