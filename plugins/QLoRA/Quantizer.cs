using System.Diagnostics;
using LoRAHub.Abstractions;
using LoRAHub.Tuners;
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
    /// <summary>
    /// Paths of the layers <see cref="QuantizeModel"/> would quantize: every Linear-like layer not yet 4-bit, each once,
    /// except the output heads and <paramref name="skip"/> (kept whole, as PEFT keeps modules_to_save: by name, dotted
    /// suffix, and everything inside), and nothing inside an adapter layer.
    /// </summary>
    public static List<string> QuantizablePaths(IAdaptableModel model, IEnumerable<string> skip)
    {
        var selection = new TargetSelection
        {
            TargetModules = TargetModuleSpec.FromPattern(".*"),
            ModulesToSave = [.. skip, .. model.OutputModuleNames, .. model.OutputModuleNames.Select(TargetResolver.LastName)],
        };
        return TargetResolver.Candidates(model.Root)
            .Where(c => LinearLayer.IsLinear(c.module) && c.module is not Linear4bit && selection.Matches(c.path))
            .Select(c => c.path).ToList();
    }

    /// <summary>Quantizes the layers and moves the rest of the model to <paramref name="device"/>; returns the quantized paths.</summary>
    public static List<string> QuantizeModel(IAdaptableModel model, QLoraOptions options, Device device, IEnumerable<string> skip,
        Action<string>? log = null)
    {
        var paths = QuantizablePaths(model, skip);
        var loaded = TargetResolver.Candidates(model.Root).Where(c => c.module is Linear4bit).Select(c => c.path).ToList();
        if (paths.Count == 0 && loaded.Count > 0)
        {
            // Loaded 4-bit already (PretrainedModel.LoadIn4bit, or a bitsandbytes folder): nothing left to quantize.
            var first = (Linear4bit)model.Root.get_submodule(loaded[0])!;
            if (first.quant_type != options.Bnb4bitQuantType || first.double_quant != options.Bnb4bitUseDoubleQuant)
                log?.Invoke($"QLoRA: the model was loaded 4-bit as {first.quant_type}{(first.double_quant ? " + double quant" : "")}; " +
                            $"its layers stay so (bnb_4bit_quant_type {options.Bnb4bitQuantType} applies to layers quantized here)");
            model.Root.to(device);
            log?.Invoke($"QLoRA: {loaded.Count} Linear layers were loaded 4-bit; nothing to quantize");
            return loaded;
        }
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
