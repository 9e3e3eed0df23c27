using LoRAHub.Abstractions;
using LoRAHub.Plugins.LoRA;
using LoRAHub.TorchExtensions;

namespace LoRAHub.Plugins.QLoRA;

/// <summary>
/// The "qlora" method (Dettmers et al. 2023): the frozen Linear weights are quantized to 4-bit NormalFloat (or FP4),
/// blockwise with optional double quantization, and LoRA adapters train on top in higher precision; the optimizer state
/// can live in CUDA unified memory (paged AdamW).
/// </summary>
public sealed class QLoraMethod : AdapterMethod<QLoraOptions>
{
    public override string Name => "qlora";

    public override string Description =>
        "QLoRA: 4-bit NF4/FP4 base weights (double quantization, bf16 compute), LoRA on top, paged AdamW (PEFT-format adapters)";

    /// <summary>Where progress lines go (the quantization summary); null for none.</summary>
    public Action<string>? Log { get; set; }

    /// <summary>Quantizes the model layer by layer onto the target device, then adds the LoRA adapter "default".</summary>
    public override IAdapter Attach(IAdaptableModel model, QLoraOptions options)
    {
        options.Validate();
        var lora = options.ToLoraOptions();
        CheckTargets(model, lora);
        var device = options.TargetDevice(model.Device);
        var skip = (options.SkipModules ?? []).Concat(options.ModulesToSave ?? []);
        var paths = Quantizer.QuantizeModel(model, options, device, skip, Log);
        // The LoRA plugin's own method builds the adapter (its constructor is internal to it).
        var adapter = (LoraAdapter)new LoraMethod().Attach(model, lora);
        return new QLoraAdapter(this, model, adapter, options, device, paths);
    }

    /// <summary>
    /// Loads a saved QLoRA (or any PEFT LoRA) adapter folder: quantizes the model with the folder's qlora_config.json
    /// settings (the defaults without one) and loads the adapter as "default". Set <paramref name="device"/> to quantize
    /// a CPU-loaded model onto a GPU.
    /// </summary>
    public override IAdapter Load(IAdaptableModel model, string directory) => Load(model, directory, null);

    public IAdapter Load(IAdaptableModel model, string directory, string? device)
    {
        if (!Directory.Exists(directory)) throw new DirectoryNotFoundException($"adapter folder {directory} does not exist");
        var options = new QLoraOptions { Device = device };
        QLoraConfigFile.Read(directory, options);
        options.Validate();
        var target = options.TargetDevice(model.Device);
        var skip = (options.SkipModules ?? []).Concat(QLoraConfigFile.ModulesToSave(directory));
        var paths = Quantizer.QuantizeModel(model, options, target, skip, Log);
        var adapter = (LoraAdapter)new LoraMethod().Load(model, directory);
        return new QLoraAdapter(this, model, adapter, options.WithLora(adapter.OptionsOf(LoraAdapter.DefaultName)), target, paths);
    }

    // Fails before any weight is quantized when target_modules names nothing the model has.
    private static void CheckTargets(IAdaptableModel model, LoraOptions lora)
    {
        var spec = lora.TargetModules;
        if (spec == null || spec.IsAllLinear) return;
        var linears = model.Root.named_modules().Where(m => m.name.Length > 0 && LinearLayer.IsLinear(m.module)).Select(m => m.name).ToList();
        if (!linears.Any(spec.Matches))
            throw new AdapterConfigurationException($"QLoRA option 'target_modules' {spec} matches no Linear layer of the model; Linear layers " +
                $"here: {string.Join(", ", linears.Select(p => p[(p.LastIndexOf('.') + 1)..]).Distinct())}");
    }
}
