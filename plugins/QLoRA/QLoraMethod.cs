using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;

namespace LoRAHub.Plugins.QLoRA;

/// <summary>
/// The "qlora" method (Dettmers et al. 2023): the frozen Linear weights are quantized to 4-bit NormalFloat (or FP4),
/// blockwise with optional double quantization, and LoRA adapters (the tuner kit's) train on top in higher precision;
/// the optimizer state can live in CUDA unified memory (paged AdamW).
/// </summary>
public sealed class QLoraMethod : AdapterMethod<QLoraOptions>, ILoraMethod
{
    public override string Name => "qlora";

    public override string Description =>
        "QLoRA: 4-bit NF4/FP4 base weights (double quantization, bf16 compute), LoRA on top, paged AdamW (PEFT-format adapters)";

    /// <summary>Where progress lines go (the quantization summary); null for none.</summary>
    public Action<string>? Log { get; set; }

    /// <summary>
    /// Quantizes the model layer by layer onto the target device, then adds the LoRA adapter "default". With
    /// init_lora_weights "loftq", the LoRA targets are quantized by LoftQ first and the adapter starts at its factors.
    /// </summary>
    public override IAdapter Attach(IAdaptableModel model, QLoraOptions options)
    {
        options.Validate();
        var lora = options.ToLoraOptions();
        CheckTargets(model, lora);
        var device = options.TargetDevice(model.Device);
        var loftq = lora.InitLoraWeights.IsLoftQ ? LoftQQuantizer.QuantizeTargets(model, options, lora, device, Log) : null;
        var paths = Quantizer.QuantizeModel(model, options, device, (options.SkipModules ?? []).Concat(options.ModulesToSave ?? []), Log);
        var adapter = LoraAdapter.Build(this, model, a => a.AddAdapter(LoraAdapter.DefaultName, lora));
        if (loftq is not null) LoftQQuantizer.CopyInto(adapter, LoraAdapter.DefaultName, loftq);
        return new QLoraAdapter(this, model, adapter, options, device, loftq is null ? paths : [.. loftq.Keys, .. paths.Except(loftq.Keys)]);
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
        options.ReadSaved(directory);
        options.Validate();
        // The adapter's config is read (and checked) before any weight is quantized; its modules_to_save stay dense.
        var saved = LoraConfigFile.Read(Path.Combine(directory, LoraConfigFile.FileName), []);
        var target = options.TargetDevice(model.Device);
        // A LoftQ adapter was trained on LoftQ's 4-bit base: that is recreated (deterministic), the factors come from the file.
        var loftq = saved.InitLoraWeights.IsLoftQ ? LoftQQuantizer.QuantizeTargets(model, options, saved, target, Log) : null;
        if (loftq is not null)
            foreach (var (a, b) in loftq.Values)
            {
                a.Dispose();
                b.Dispose();
            }
        var paths = Quantizer.QuantizeModel(model, options, target, (options.SkipModules ?? []).Concat(saved.ModulesToSave ?? []), Log);
        if (loftq is not null) paths = [.. loftq.Keys, .. paths.Except(loftq.Keys)];
        var adapter = LoraAdapter.Build(this, model, a => a.LoadAdapter(directory, LoraAdapter.DefaultName));
        return new QLoraAdapter(this, model, adapter, options.WithLora(adapter.OptionsOf(LoraAdapter.DefaultName)), target, paths);
    }

    /// <summary>A PEFT LoRA folder (no LoRA variant set) with qlora_config.json beside it.</summary>
    public override bool Claims(string directory) => AdapterFolder.IsLoraFolder(directory, methodConfigFile: QLoraOptions.ConfigFileName);

    // Fails before any weight is quantized when the targets select nothing the model has.
    private static void CheckTargets(IAdaptableModel model, LoraOptions lora) =>
        TargetResolver.Resolve(model, lora.Selection(TargetResolver.EffectiveTargets(model, lora.TargetModules, "QLoRA")), "QLoRA");
}
