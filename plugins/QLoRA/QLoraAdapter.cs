using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Modules;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.QLoRA;

/// <summary>
/// QLoRA on one model: the base Linear layers are <see cref="Linear4bit"/> (frozen, 4-bit), LoRA adapters train on top
/// (fp32 A and B, matmuls in the activations' dtype), and the optimizer is <see cref="PagedAdamW"/> when paged.
/// Saving writes the LoRA adapter in PEFT's format (PEFT loads it onto a bnb-4bit model) plus qlora_config.json with the
/// 4-bit settings. An in-place <see cref="Merge"/> would re-quantize and is refused; <see cref="MergeAndUnload()"/> turns
/// the model into a dense one (dequantize, add s·B·A, round once), ready for LoRAHub.Models.PretrainedModel.Save.
/// <see cref="Unload"/> and Dispose remove the LoRA layers; the base stays quantized (its dense weights were freed
/// while quantizing).
/// </summary>
public sealed class QLoraAdapter : IAdapter, IAdapterSet
{
    private readonly IAdaptableModel model;
    private readonly QLoraOptions options;
    private bool unloaded;

    internal QLoraAdapter(IAdapterMethod method, IAdaptableModel model, LoraAdapter lora, QLoraOptions options, Device device,
        IReadOnlyList<string> quantizedPaths)
    {
        Method = method;
        this.model = model;
        Lora = lora;
        this.options = options;
        Device = device;
        QuantizedPaths = quantizedPaths;
    }

    public IAdapterMethod Method { get; }

    // Several adapters over one quantized base (serve/generate mixed batches): the LoRA layers do it all.
    public IReadOnlyList<string> AdapterNames => Lora.AdapterNames;

    public void LoadAdapter(string directory, string name) => Lora.LoadAdapter(directory, name);

    public void DeleteAdapter(string name) => Lora.DeleteAdapter(name);

    public IDisposable UseAdapterPerRow(IReadOnlyList<string> rowAdapters) => Lora.UseAdapterPerRow(rowAdapters);

    /// <summary>The LoRA adapter on top of the quantized base (multi-adapter operations, layer access).</summary>
    public LoraAdapter Lora { get; }

    public object Options => options;

    /// <summary>Where the quantized weights and the adapters live.</summary>
    public Device Device { get; }

    /// <summary>Module paths that were quantized to 4 bits.</summary>
    public IReadOnlyList<string> QuantizedPaths { get; }

    /// <summary>The 4-bit layers currently in the model (below the LoRA wrappers), each once (as PyTorch's named_modules).</summary>
    public IEnumerable<(string path, Linear4bit layer)> QuantizedLayers()
    {
        // TorchSharp's named_modules lists a module once per path that reaches it.
        var seen = new HashSet<Linear4bit>(ReferenceEqualityComparer.Instance);
        return model.Root.named_modules().Where(m => m.module is Linear4bit q && seen.Add(q)).Select(m => (m.name, (Linear4bit)m.module));
    }

    /// <summary>Bytes of all 4-bit weights with their constants.</summary>
    public long QuantizedWeightBytes => QuantizedLayers().Sum(l => l.layer.weight_bytes);

    private void CheckLive()
    {
        if (unloaded)
            throw new InvalidOperationException("this QLoRA adapter was unloaded (MergeAndUnload, Unload or Dispose): the model is a plain model now");
    }

    public IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay)
    {
        CheckLive();
        return Lora.ParameterGroups(learningRate, weightDecay);
    }

    /// <summary>PagedAdamW on CUDA when paged_optimizer is on; null (the trainer's AdamW) otherwise.</summary>
    public Optimizer? CreateOptimizer(IReadOnlyList<ParamGroup> groups, OptimizerSettings settings)
    {
        CheckLive();
        if (!options.PagedOptimizer || Device.type != DeviceType.CUDA) return null;
        return new PagedAdamW(groups, settings.Beta1, settings.Beta2, settings.Eps);
    }

    public IReadOnlyDictionary<string, Tensor> StateDict()
    {
        CheckLive();
        return Lora.StateDict();
    }

    /// <summary>adapter_config.json + adapter_model.safetensors (PEFT's LoRA format) and qlora_config.json.</summary>
    public void Save(string directory)
    {
        CheckLive();
        Lora.Save(directory);
        options.Save(directory);
    }

    public bool Enabled
    {
        get => Lora.Enabled;
        set
        {
            CheckLive();
            Lora.Enabled = value;
        }
    }

    public void SetTraining(bool training) => model.Root.train(training);

    public long ModelParameterCount =>
        Lora.ModelParameterCount + QuantizedLayers().Sum(l => l.layer.in_features * l.layer.out_features);

    public string TrainableParametersReport() => TrainableReport.Format(Lora.TrainableParameterCount, ModelParameterCount);

    // ---- merge ----

    /// <summary>True: <see cref="MergeAndUnload()"/> folds the adapter into dense weights (an in-place <see cref="Merge"/> is refused).</summary>
    public bool CanMerge => !unloaded;

    /// <summary>Refused with the reason and a pointer to <see cref="MergeAndUnload()"/> (the kit's check for 4-bit bases).</summary>
    public void Merge()
    {
        CheckLive();
        Lora.Merge();
    }

    public void Unmerge() => Lora.Unmerge();

    /// <summary>
    /// Folds the active adapter into dense weights: every 4-bit layer becomes a dense Linear in the model's dtype (bf16
    /// for a model loaded in bf16) with W = dequantize(W₄) + s·B·A, computed in fp32 and rounded once; the LoRA layers
    /// are removed. The model is then an ordinary dense model (save it with LoRAHub.Models.PretrainedModel.Save).
    /// The 4-bit weights are freed.
    /// </summary>
    public IAdaptableModel MergeAndUnload() => MergeAndUnload(null);

    /// <summary><see cref="MergeAndUnload()"/>, placing the dense weights on <paramref name="device"/> (e.g. the CPU for a model larger than the GPU).</summary>
    public IAdaptableModel MergeAndUnload(Device? device, ScalarType? dtype = null)
    {
        CheckLive();
        var type = dtype ?? BaseTuner<LoraLinear>.DenseDType(model);
        Lora.MergeAndUnload(device, type);
        // The quantized layers that carried no adapter become dense too: the model is an ordinary one.
        foreach (var (path, q) in QuantizedLayers().ToList())
        {
            model.Root.replace_submodule(path, BaseTuner<LoraLinear>.Dense(q, type, device));
            q.Dispose();
        }
        unloaded = true;
        return model;
    }

    /// <summary>Removes the LoRA layers; the base stays 4-bit. Returns the (quantized) model.</summary>
    public IAdaptableModel Unload()
    {
        CheckLive();
        Lora.Unload();
        unloaded = true;
        return model;
    }

    public void Dispose()
    {
        if (unloaded) return;
        Unload();
    }
}
