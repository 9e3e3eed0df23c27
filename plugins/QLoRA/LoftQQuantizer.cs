using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Modules;
using LoRAHub.TorchExtensions.Quantization;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.QLoRA;

/// <summary>
/// QLoRA with init_lora_weights "loftq": each LoRA target is quantized by LoftQ (the kit's <see cref="LoftQ"/>) with this
/// method's own 4-bit settings (type, blocksize, double quantization), so the 4-bit base is exactly the Q LoftQ chose and
/// the adapter starts at the rank-r correction of its error. Runs before the other layers are quantized, one layer at a
/// time on the target device; the factors are copied into the adapter once it exists.
/// </summary>
internal static class LoftQQuantizer
{
    /// <summary>Quantizes the targets of <paramref name="lora"/> by LoftQ; returns A and B per path (the caller disposes them).</summary>
    public static Dictionary<string, (Tensor a, Tensor b)> QuantizeTargets(IAdaptableModel model, QLoraOptions options, LoraOptions lora, Device device,
        Action<string>? log)
    {
        if (device.type == DeviceType.CUDA && !torch.cuda.is_available())
            throw QLoraOptions.Bad("device", $"is {device} but CUDA is not available (is the native library a CUDA build?); use \"cpu\"");
        var paths = TargetResolver.Resolve(model, lora.Selection(TargetResolver.EffectiveTargets(model, lora.TargetModules, "QLoRA")), "QLoRA");
        var factors = new Dictionary<string, (Tensor a, Tensor b)>();
        var quantize = LoftQ.FourBitRoundTrip(options.Bnb4bitQuantType, options.Bnb4bitBlocksize, options.Bnb4bitUseDoubleQuant);
        double before = 0, after = 0;
        foreach (var path in paths)
        {
            var module = model.Root.get_submodule(path)!;
            if (module is Linear4bit)
                throw QLoraOptions.Bad("init_lora_weights", $"\"loftq\" needs the full-precision weights, but '{path}' was loaded 4-bit already; " +
                    "load the model in bf16/fp32 and let QLoRA quantize it");
            var linear = LinearLayer.From(module)
                ?? throw QLoraOptions.Bad("init_lora_weights", $"\"loftq\" applies to Linear layers; '{path}' is a {module.TypeName()}");
            var (r, alpha) = (lora.RankFor(path), lora.AlphaFor(path));
            Linear4bit quantized;
            using (var scope = NewDisposeScope())
            {
                var w = linear.dense_weight().to(ScalarType.Float32, device, copy: true);
                var (input, dequantized, a, b) = LoftQ.Run(w, r, LoraLinear.ScalingFor(r, alpha, lora.UseRslora), lora.LoftqIter, quantize);
                before += LoftQ.RelativeError(w, quantize(w), zeros_like(a), zeros_like(b), 1);
                after += LoftQ.RelativeError(w, dequantized, a, b, LoraLinear.ScalingFor(r, alpha, lora.UseRslora));
                var q = FourBit.Quantize(input, options.Bnb4bitQuantType, options.Bnb4bitBlocksize, options.Bnb4bitUseDoubleQuant);
                var bias = linear.bias?.detach().to(device, copy: true);
                quantized = new Linear4bit(q, bias?.DetachFromDisposeScope(), options.ComputeDType);
                factors[path] = (a.DetachFromDisposeScope(), b.DetachFromDisposeScope());
            }
            quantized.train(module.training);
            model.Root.replace_submodule(path, quantized);
            module.Dispose();
        }
        log?.Invoke($"QLoRA: LoftQ ({lora.LoftqIter} iteration(s)) on {paths.Count} layers: mean relative error of the 4-bit base " +
                    $"{before / paths.Count:G3} → {after / paths.Count:G3} with the adapter");
        return factors;
    }

    /// <summary>Copies the LoftQ factors into the adapter's A and B and frees them.</summary>
    public static void CopyInto(LoraAdapter adapter, string name, Dictionary<string, (Tensor a, Tensor b)> factors)
    {
        using var _ = no_grad();
        foreach (var (path, (a, b)) in factors)
        {
            var layer = adapter.Layers[path];
            layer.A(name).copy_(a);
            layer.B(name).copy_(b);
            layer.MarkAdapterWeightsChanged();
            a.Dispose();
            b.Dispose();
        }
    }
}
