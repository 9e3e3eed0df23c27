using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.QLoRA;

/// <summary>
/// QLoRA options: the LoRA options (PEFT's LoraConfig names) plus the 4-bit settings under transformers'
/// BitsAndBytesConfig names (bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype, ...).
/// Defaults follow the QLoRA paper: NF4, double quantization, bf16 compute, adapters on every Linear, paged AdamW.
/// The <see cref="ConfigKeyAttribute"/> fields declared here are what qlora_config.json holds beside the adapter.
/// </summary>
public sealed class QLoraOptions : LoraOptions
{
    /// <summary>The QLoRA paper adapts every Linear layer: target_modules defaults to "all-linear".</summary>
    public QLoraOptions() => TargetModules = TargetModuleSpec.AllLinear;

    // ---- 4-bit base weights ----

    /// <summary>"nf4" (NormalFloat4, the paper's) or "fp4".</summary>
    [ConfigKey("bnb_4bit_quant_type")] public string Bnb4bitQuantType { get; set; } = "nf4";

    /// <summary>Quantize the absmax constants again (8 bits, blocks of 256): 4.5 → ≈ 4.127 bits per weight.</summary>
    [ConfigKey("bnb_4bit_use_double_quant")] public bool Bnb4bitUseDoubleQuant { get; set; } = true;

    /// <summary>dtype the weights are dequantized to for compute: "bfloat16", "float16" or "float32".</summary>
    [ConfigKey("bnb_4bit_compute_dtype")] public string Bnb4bitComputeDtype { get; set; } = "bfloat16";

    /// <summary>Weights per absmax (64 in the paper).</summary>
    [ConfigKey("bnb_4bit_blocksize")] public int Bnb4bitBlocksize { get; set; } = 64;

    /// <summary>Modules never quantized, besides the output head (bitsandbytes' llm_int8_skip_modules), by last name or path.</summary>
    [ConfigKey("llm_int8_skip_modules")] public List<string>? SkipModules { get; set; }

    // ---- placement and optimizer ----

    /// <summary>
    /// Where the quantized model lives ("cuda", "cuda:1", "cpu"); null keeps the model's device. A model loaded on the CPU
    /// is quantized layer by layer onto this device, so its bf16 weights never need to fit there.
    /// </summary>
    public string? Device { get; set; }

    /// <summary>Paged AdamW (optimizer state in CUDA unified memory) on CUDA; plain AdamW otherwise.</summary>
    [ConfigKey("paged_optimizer")] public bool PagedOptimizer { get; set; } = true;

    internal static readonly string[] ComputeDtypes = ["bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float"];

    internal static AdapterConfigurationException Bad(string option, string problem) => TargetResolver.Bad("QLoRA", option, problem);

    /// <summary>Throws AdapterConfigurationException naming the first bad option (4-bit options, then the LoRA ones).</summary>
    public override void Validate()
    {
        if (Bnb4bitQuantType is not ("nf4" or "fp4"))
            throw Bad("bnb_4bit_quant_type", $"must be \"nf4\" or \"fp4\", got \"{Bnb4bitQuantType}\"");
        if (Bnb4bitBlocksize <= 0 || Bnb4bitBlocksize % 2 != 0 || Bnb4bitBlocksize > 4096)
            throw Bad("bnb_4bit_blocksize", $"must be an even number between 2 and 4096 (64 in the paper), got {Bnb4bitBlocksize}");
        _ = ComputeDType;
        _ = TargetDevice(torch.CPU);
        foreach (var m in SkipModules ?? [])
            if (string.IsNullOrWhiteSpace(m)) throw Bad("skip_modules", "contains an empty name");
        base.Validate();
    }

    /// <summary>The compute dtype as a ScalarType.</summary>
    public ScalarType ComputeDType => (Bnb4bitComputeDtype ?? "").Trim().ToLowerInvariant() switch
    {
        "bfloat16" or "bf16" => ScalarType.BFloat16,
        "float16" or "fp16" or "half" => ScalarType.Float16,
        "float32" or "fp32" or "float" => ScalarType.Float32,
        _ => throw Bad("bnb_4bit_compute_dtype", $"must be \"bfloat16\", \"float16\" or \"float32\", got \"{Bnb4bitComputeDtype}\""),
    };

    /// <summary>The device to quantize onto: <see cref="Device"/>, or the model's.</summary>
    public Device TargetDevice(Device modelDevice) =>
        string.IsNullOrWhiteSpace(Device) ? modelDevice
            : ParseDevice(Device) ?? throw Bad("device", $"is '{Device}', not a device; use cpu, cuda or cuda:N");

    // "cpu", "cuda" (device 0), "cuda:N"; null otherwise (TorchSharp's Device parser accepts any DeviceType name).
    private static Device? ParseDevice(string text)
    {
        var s = text.Trim().ToLowerInvariant();
        if (s == "cpu") return torch.CPU;
        if (s is "cuda" or "gpu") return new Device(DeviceType.CUDA, 0);
        return s.StartsWith("cuda:", StringComparison.Ordinal) && int.TryParse(s.AsSpan(5), out var index) && index >= 0
            ? new Device(DeviceType.CUDA, index)
            : null;
    }

    /// <summary>The LoRA part as plain LoRA options (what the LoRA plugin attaches and writes to adapter_config.json).</summary>
    public LoraOptions ToLoraOptions()
    {
        var lora = new LoraOptions();
        lora.CopyLoraSettingsFrom(this);
        return lora;
    }

    /// <summary>QLoRA options carrying a saved adapter's LoRA options and these 4-bit settings.</summary>
    internal QLoraOptions WithLora(LoraOptions o)
    {
        var copy = (QLoraOptions)Clone();
        copy.CopyLoraSettingsFrom(o);
        return copy;
    }

    /// <summary>qlora_config.json: the fields declared here (transformers' BitsAndBytesConfig names) plus its constant keys.</summary>
    public const string ConfigFileName = "qlora_config.json";

    private static readonly Dictionary<string, object?> ConstantKeys = new() { ["load_in_4bit"] = true, ["quant_method"] = "bitsandbytes" };

    internal void Save(string directory) =>
        ConfigFile.Write(Path.Combine(directory, ConfigFileName), this, ConfigFields.DeclaredOn(typeof(QLoraOptions)), ConstantKeys);

    /// <summary>The 4-bit settings of a saved adapter folder, read into these options; defaults where the file is absent.</summary>
    internal void ReadSaved(string directory)
    {
        var path = Path.Combine(directory, ConfigFileName);
        if (!File.Exists(path)) return;
        using var doc = ConfigFile.Read(path);
        ConfigFields.ReadFrom(doc.RootElement, this, ConfigFields.DeclaredOn(typeof(QLoraOptions)), path);
    }
}
