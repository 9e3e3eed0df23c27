using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Modules;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using ParamGroup = LoRAHub.TorchExtensions.Optim.ParamGroup;

namespace LoRAHub.Tuners;

/// <summary>
/// An adapter that puts <typeparamref name="TLayer"/> layers into a model (PEFT's BaseTuner): injection, the enabled
/// switch, merge and unmerge in place, merge_and_unload and unload, and disposal (which unloads). A method implements
/// the layers, its parameter groups and its files; everything here is shared.
/// </summary>
public abstract class BaseTuner<TLayer> : IAdapter where TLayer : TunerLayer
{
    private readonly Dictionary<string, TLayer> layers = new();
    private bool enabled = true;
    private bool unloaded;

    protected BaseTuner(IAdapterMethod method, IAdaptableModel model)
    {
        Method = method;
        Model = model;
    }

    public IAdapterMethod Method { get; }

    /// <summary>The model the adapter is attached to (after <see cref="MergeAndUnload()"/> or <see cref="Unload"/>, a plain model).</summary>
    public IAdaptableModel Model { get; }

    public abstract object Options { get; }

    /// <summary>The adapter layers by module path, in the order they were injected.</summary>
    public IReadOnlyDictionary<string, TLayer> Layers => layers;

    /// <summary>PEFT's _mark_only_adapters_as_trainable, first half: every base parameter frozen (methods then mark their own).</summary>
    protected void FreezeBase() => Model.Root.requires_grad_(false);

    /// <summary>
    /// Wraps the module at <paramref name="path"/> in <paramref name="create"/>(module), or returns the layer already
    /// there. The layer takes the module's train mode and the adapter's enabled state. When the model cannot hold it (a
    /// field typed Linear), the module goes back where it was and the layer is freed before the error propagates.
    /// </summary>
    protected TLayer Inject(string path, Func<nn.Module<Tensor, Tensor>, TLayer> create)
    {
        CheckLive();
        if (layers.TryGetValue(path, out var existing)) return existing;
        var module = Model.Root.get_submodule(path) ?? throw new KeyNotFoundException($"the model has no module '{path}'");
        var typed = module as nn.Module<Tensor, Tensor>
            ?? throw new AdapterConfigurationException($"'{path}' is a {module.TypeName()}, not a Module<Tensor, Tensor>: {Method.Name} cannot wrap it");
        var layer = create(typed);
        layer.train(module.training);
        layer.AdaptersEnabled = enabled;
        try
        {
            Model.Root.replace_submodule(path, layer);
        }
        catch
        {
            layer.Unwrap();
            layer.Dispose();
            throw;
        }
        layers[path] = layer;
        return layer;
    }

    /// <summary>Wraps every path (<see cref="Inject"/>); when one cannot be wrapped, those wrapped so far go back first.</summary>
    protected void InjectAll(IEnumerable<string> paths, Func<string, nn.Module<Tensor, Tensor>, TLayer> create)
    {
        try
        {
            foreach (var path in paths) Inject(path, b => create(path, b));
        }
        catch
        {
            Unload();
            throw;
        }
    }

    /// <summary>False: the model computes exactly its base output (a merged adapter is unmerged first, as in PEFT).</summary>
    public virtual bool Enabled
    {
        get => enabled;
        set
        {
            CheckLive();
            if (!value) Unmerge();
            enabled = value;
            foreach (var layer in layers.Values) layer.AdaptersEnabled = value;
            OnEnabledChanged();
        }
    }

    /// <summary>Called after <see cref="Enabled"/> changed (e.g. to swap modules_to_save copies).</summary>
    protected virtual void OnEnabledChanged() { }

    public virtual bool CanMerge => !unloaded;

    public bool IsMerged => layers.Values.Any(l => l.Merged);

    /// <summary>Folds the adapter into the base weights in place (reversible by <see cref="Unmerge"/>); refused on a 4-bit base.</summary>
    public virtual void Merge()
    {
        CheckLive();
        if (!CanMerge) throw new NotSupportedException($"{Method.Name} cannot be merged into the base weights");
        if (layers.FirstOrDefault(l => l.Value.IsQuantized) is { Value: not null } quantized)
            throw new InvalidOperationException($"'{quantized.Key}' has a 4-bit base: an in-place merge would quantize the merged weight " +
                "again (lossy, not reversible). Use MergeAndUnload(), which gives a dense model with the merged weights in bf16 (or the model's dtype)");
        foreach (var layer in layers.Values) layer.Merge();
    }

    /// <summary>Subtracts what <see cref="Merge"/> added.</summary>
    public virtual void Unmerge()
    {
        foreach (var layer in layers.Values) layer.Unmerge();
    }

    /// <summary>
    /// PEFT's merge_and_unload: folds the adapter into the base layers and puts them back in place of the adapter layers,
    /// so the model is a plain one (its state dict has the base model's keys, e.g. for PretrainedModel.Save). A 4-bit
    /// base becomes a dense Linear: dequantized to fp32, merged, rounded once to the model's dtype (bf16 when the model's
    /// dtype is not a float type). The adapter is unloaded afterwards.
    /// </summary>
    public IAdaptableModel MergeAndUnload() => MergeAndUnload(null, null);

    /// <summary><see cref="MergeAndUnload()"/>, placing the dense weights made from 4-bit bases on <paramref name="device"/> in <paramref name="dtype"/>.</summary>
    public virtual IAdaptableModel MergeAndUnload(Device? device, ScalarType? dtype)
    {
        CheckLive();
        if (!CanMerge) throw new NotSupportedException($"{Method.Name} cannot be merged into the base weights");
        var type = dtype ?? DenseDType(Model);
        using (no_grad())
        {
            foreach (var layer in layers.Values)
            {
                if (layer.IsQuantized)
                {
                    var dense = Dense(layer.base_linear, ScalarType.Float32, device);
                    layer.ReplaceBase(dense).Dispose();
                    layer.Merge();
                    dense.to(type);
                }
                else layer.Merge();
            }
        }
        Release(merged: true);
        return Model;
    }

    /// <summary>PEFT's unload: the base layers go back without merging, the adapter is dropped; returns the plain model.</summary>
    public virtual IAdaptableModel Unload()
    {
        CheckLive();
        Unmerge();
        Release(merged: false);
        return Model;
    }

    /// <summary>
    /// Called once the adapter layers are out of the model: a method restores what else it changed (modules_to_save,
    /// attention). <paramref name="merged"/>: from <see cref="MergeAndUnload()"/> (trained copies stay) or not.
    /// </summary>
    protected virtual void OnUnloaded(bool merged) { }

    private void Release(bool merged)
    {
        foreach (var (path, layer) in layers)
        {
            Model.Root.replace_submodule(path, layer.Unwrap());
            layer.Dispose();
        }
        layers.Clear();
        unloaded = true;
        OnUnloaded(merged);
    }

    /// <summary>True once <see cref="MergeAndUnload()"/> or <see cref="Unload"/> ran: the model is plain and the adapter has no layers.</summary>
    public bool IsUnloaded => unloaded;

    protected void CheckLive()
    {
        if (unloaded)
            throw new InvalidOperationException($"this {Method.Name} adapter was unloaded (MergeAndUnload, Unload or Dispose): the model is a plain model again");
    }

    /// <summary>The dtype a 4-bit base becomes: the model's when it is a float type, else bf16.</summary>
    public static ScalarType DenseDType(IAdaptableModel model) =>
        model.DType is ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float32 or ScalarType.Float64 ? model.DType : ScalarType.BFloat16;

    /// <summary>A frozen dense Linear with a copy of <paramref name="source"/>'s weight (dequantized if 4-bit) and bias.</summary>
    public static Linear Dense(ILinearLayer source, ScalarType dtype, Device? device = null)
    {
        using var scope = NewDisposeScope();
        var target = device ?? source.weight_device;
        var w = source is Linear4bit q ? q.dense_weight(ScalarType.Float32) : source.dense_weight();
        var weight = new Parameter(w.to(dtype, target, copy: true).DetachFromDisposeScope(), requires_grad: false);
        var bias = source.bias is { } b ? new Parameter(b.to(dtype, target, copy: true).DetachFromDisposeScope(), requires_grad: false) : null;
        return nn.Linear(weight, bias);
    }

    public abstract IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay);

    // The contract's optional hooks, virtual here so that a method's override is what IAdapter calls.

    public virtual Optimizer? CreateOptimizer(IReadOnlyList<ParamGroup> groups, OptimizerSettings settings) => null;

    public virtual void OnStepBegin(long step) { }

    public virtual Tensor? AuxiliaryLoss() => null;

    public virtual void OnAfterBackward(long step) { }

    public virtual void OnStepEnd(long step) { }

    public virtual void SetTraining(bool training) { }

    public virtual IReadOnlyDictionary<string, Tensor> TrainingState() => new Dictionary<string, Tensor>();

    public virtual void LoadTrainingState(IReadOnlyDictionary<string, Tensor> state) { }

    /// <summary>PEFT's print_trainable_parameters line.</summary>
    public virtual string TrainableParametersReport() =>
        TrainableReport.Format(ParameterGroups(0, 0).SelectMany(g => g.Parameters).Sum(p => p.numel()), ModelParameterCount);

    public abstract IReadOnlyDictionary<string, Tensor> StateDict();

    public abstract void Save(string directory);

    /// <summary>Copies the folder's adapter_model.safetensors into the live tensors of <see cref="StateDict"/> (every key, shapes checked).</summary>
    public void LoadWeights(string directory) =>
        torchx.load_safetensors_into(StateDict(), Path.Combine(directory, AdapterWeightsFile.FileName));

    public virtual long ModelParameterCount => Model.Root.parameters().Sum(p => p.numel());

    /// <summary>Unloads (as <see cref="Unload"/>) unless that already happened.</summary>
    public void Dispose()
    {
        if (unloaded) return;
        Unload();
        GC.SuppressFinalize(this);
    }
}
