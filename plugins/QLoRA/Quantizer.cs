using System.Diagnostics;
using LoRAHub.Abstractions;
using LoRAHub.Plugins.LoRA;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Modules;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.QLoRA;

/// <summary>
/// Replaces a model's Linear layers by <see cref="Linear4bit"/> one at a time, as transformers' load_in_4bit does:
/// every Linear except the output head (and skip_modules / modules_to_save). Each dense weight is moved to the target
/// device, quantized there and freed before the next, so GPU memory holds at most one dense layer besides the 4-bit
/// weights; the model's other modules (embeddings, norms, head) are moved to the device afterwards.
/// </summary>
public static class Quantizer
{
    /// <summary>Paths of the layers <see cref="QuantizeModel"/> would quantize.</summary>
    public static List<string> QuantizablePaths(IAdaptableModel model, IEnumerable<string> skip)
    {
        var skipped = skip.ToList();
        var heads = model.OutputModuleNames.ToHashSet();
        var headNames = model.OutputModuleNames.Select(LastName).ToHashSet();
        var result = new List<string>();
        // TorchSharp's named_modules lists a module once per path that reaches it: quantize each once.
        var seen = new HashSet<nn.Module>(ReferenceEqualityComparer.Instance);
        foreach (var (path, module) in model.Root.named_modules())
        {
            if (path.Length == 0 || !LinearLayer.IsLinear(module) || module is Linear4bit || !seen.Add(module)) continue;
            if (heads.Contains(path) || headNames.Contains(LastName(path))) continue;
            if (skipped.Any(s => path == s || LastName(path) == s || path.EndsWith("." + s, StringComparison.Ordinal) ||
                                 path.StartsWith(s + ".", StringComparison.Ordinal))) continue;
            if (IsInsideLora(model.Root, path)) continue;
            result.Add(path);
        }
        return result;
    }

    private static bool IsInsideLora(nn.Module root, string path)
    {
        var parts = path.Split('.');
        for (var i = 1; i < parts.Length; i++)
            if (root.get_submodule(string.Join('.', parts.Take(i))) is LoraLinear) return true;
        return false;
    }

    private static string LastName(string path) => path[(path.LastIndexOf('.') + 1)..];

    /// <summary>Quantizes the layers and moves the rest of the model to <paramref name="device"/>; returns the quantized paths.</summary>
    public static List<string> QuantizeModel(IAdaptableModel model, QLoraOptions options, Device device, IEnumerable<string> skip,
        Action<string>? log = null)
    {
        var paths = QuantizablePaths(model, skip);
        if (paths.Count == 0)
            throw new AdapterConfigurationException("QLoRA found no Linear layer to quantize besides the output head " +
                $"({string.Join(", ", model.OutputModuleNames.DefaultIfEmpty("none"))}); QLoRA needs a model built from Linear layers");
        if (device.type == DeviceType.CUDA && !torch.cuda.is_available())
            throw QLoraOptions.Bad("device", $"is {device} but CUDA is not available (is the native library a CUDA build?); use \"cpu\"");
        var sw = Stopwatch.StartNew();
        long denseBytes = 0, quantizedBytes = 0;
        foreach (var path in paths)
        {
            var module = model.Root.get_submodule(path)!;
            var linear = LinearLayer.From(module)!;
            var quantized = Linear4bit.FromLinear(linear, device, options.Bnb4bitQuantType, options.Bnb4bitBlocksize,
                options.Bnb4bitUseDoubleQuant, options.ComputeDType);
            quantized.train(module.training);
            model.Root.replace_submodule(path, quantized);
            denseBytes += linear.in_features * linear.out_features * linear.weight_dtype.ElementSize();
            quantizedBytes += quantized.weight_bytes;
            module.Dispose(); // frees the dense weight (host or device) before the next layer
        }
        model.Root.to(device);
        log?.Invoke($"QLoRA: quantized {paths.Count} Linear layers to {options.Bnb4bitQuantType}" +
                    $"{(options.Bnb4bitUseDoubleQuant ? " + double quant" : "")} on {device}: {denseBytes / (double)(1L << 30):0.00} GiB → " +
                    $"{quantizedBytes / (double)(1L << 30):0.00} GiB in {sw.Elapsed.TotalSeconds:0.0} s");
        return paths;
    }
}
