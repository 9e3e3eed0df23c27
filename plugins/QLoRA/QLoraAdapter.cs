using LoRAHub.Abstractions;
using LoRAHub.Plugins.LoRA;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Modules;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using Linear = TorchSharp.Modules.Linear;
using Parameter = TorchSharp.Modules.Parameter;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.QLoRA;

/// <summary>
/// QLoRA on one model: the base Linear layers are <see cref="Linear4bit"/> (frozen, 4-bit), LoRA adapters train on top
/// (fp32 A and B, matmuls in the activations' dtype), and the optimizer is <see cref="PagedAdamW"/> when paged.
/// Saving writes the LoRA adapter in PEFT's format (PEFT loads it onto a bnb-4bit model) plus qlora_config.json with the
/// 4-bit settings. <see cref="Merge"/> turns the model into a dense one (dequantize, add s·B·A, round once), ready for
/// LoRAHub.Models.PretrainedModel.Save. Dispose removes the LoRA layers; the base stays quantized (its dense weights
/// were freed while quantizing).
/// </summary>
public sealed class QLoraAdapter : IAdapter
{
    private readonly IAdaptableModel model;
    private readonly QLoraOptions options;
    private bool mergedToDense;
    private bool disposed;

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
        ObjectDisposedException.ThrowIf(disposed, this);
        if (mergedToDense)
            throw new InvalidOperationException("this QLoRA adapter was merged into dense weights; the model is an ordinary dense model now");
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
        QLoraConfigFile.Write(Path.Combine(directory, QLoraConfigFile.FileName), options);
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

    public bool CanMerge => !mergedToDense;

    /// <summary>
    /// Folds the active adapter into dense weights: every 4-bit layer becomes a dense Linear in the model's dtype (bf16
    /// for a model loaded in bf16) with W = dequantize(W₄) + s·B·A, computed in fp32 and rounded once; the LoRA layers
    /// are removed. The model is then an ordinary dense model (save it with LoRAHub.Models.PretrainedModel.Save).
    /// Not reversible: the 4-bit weights are freed.
    /// </summary>
    public void Merge() => MergeToDense(null);

    /// <summary><see cref="Merge"/>, placing the dense weights on <paramref name="device"/> (e.g. the CPU for a model larger than the GPU).</summary>
    public void MergeToDense(Device? device, ScalarType? dtype = null)
    {
        CheckLive();
        var type = dtype ?? (model.DType is ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float32 or ScalarType.Float64
            ? model.DType : ScalarType.BFloat16);
        using var _ = torch.no_grad();
        var active = Lora.Enabled ? Lora.ActiveAdapter : null;
        foreach (var (path, layer) in Lora.Layers.ToList())
        {
            using var scope = torch.NewDisposeScope();
            var delta = active != null && layer.HasAdapter(active) ? layer.DeltaWeight(active).to(ScalarType.Float32) : null;
            var dense = Dense(layer.base_linear, delta, device, type);
            model.Root.replace_submodule(path, dense);
            layer.base_layer.Dispose();
            layer.Dispose();
        }
        foreach (var (path, q) in QuantizedLayers().ToList())
        {
            using var scope = torch.NewDisposeScope();
            model.Root.replace_submodule(path, Dense(q, null, device, type));
            q.Dispose();
        }
        mergedToDense = true;
    }

    // A frozen Linear holding new tensors (copies: the source layer is freed afterwards).
    private static Linear Dense(ILinearLayer source, Tensor? delta, Device? device, ScalarType dtype)
    {
        var target = device ?? source.weight_device;
        var w = source is Linear4bit q ? q.dense_weight(ScalarType.Float32) : source.dense_weight().to(ScalarType.Float32);
        if (delta is not null) w = w + delta.to(w.device);
        var weight = new Parameter(w.to(dtype, target, copy: true).DetachFromDisposeScope(), requires_grad: false);
        var bias = source.bias is { } b ? new Parameter(b.to(dtype, target, copy: true).DetachFromDisposeScope(), requires_grad: false) : null;
        return nn.Linear(weight, bias);
    }

    public void Unmerge() =>
        throw new NotSupportedException("a QLoRA merge replaces the 4-bit weights by dense ones and cannot be undone; " +
                                        "load the base model and the saved adapter again to go back");

    public void Dispose()
    {
        if (disposed) return;
        disposed = true;
        if (!mergedToDense)
        {
            Lora.Dispose();
            return;
        }
        // Merged: the LoRA layers are gone from the model and their tensors freed; modules_to_save copies stay in use.
    }
}
