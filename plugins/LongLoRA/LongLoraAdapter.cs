using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.LongLoRA;

/// <summary>
/// LoRA adapters (with the embeddings and norms as trainable copies) plus shifted sparse attention while training.
/// In inference mode, or disabled, the model's own attention runs: LongLoRA models need nothing special to serve.
/// </summary>
public sealed class LongLoraAdapter : IAdapter, IAdapterSet
{
    private readonly IAdaptableModel model;
    private readonly LoraAdapter lora;
    private readonly LongLoraOptions options;
    private readonly AttentionFunction original;
    private readonly AttentionFunction shifted;
    private bool training = true;
    private bool unloaded;

    internal LongLoraAdapter(IAdapterMethod method, IAdaptableModel model, LoraAdapter lora, LongLoraOptions options)
    {
        Method = method;
        this.model = model;
        this.lora = lora;
        this.options = options;
        original = model.Attention;
        var groups = options.Groups;
        // Training uses S²-Attn; inference and KV-cache steps (query shorter than keys) use the model's own attention.
        shifted = (q, k, v, mask) => training && lora.Enabled && q.size(2) == k.size(2) && k.size(1) == q.size(1)
            ? ShiftedSparseAttention.Forward(q, k, v, mask, groups)
            : original(q, k, v, mask);
        if (options.UseS2Attn) model.Attention = shifted;
    }

    public IAdapterMethod Method { get; }

    public object Options => options;

    /// <summary>The LoRA adapter underneath (layers, merge, PEFT state).</summary>
    public LoraAdapter Lora => lora;

    public bool Enabled
    {
        get => lora.Enabled;
        set => lora.Enabled = value;
    }

    // Named adapters and mixed batches are the LoRA adapter's (its layers carry them).
    public IReadOnlyList<string> AdapterNames => lora.AdapterNames;

    public void LoadAdapter(string directory, string name) => lora.LoadAdapter(directory, name);

    public void DeleteAdapter(string name) => lora.DeleteAdapter(name);

    public IDisposable UseAdapterPerRow(IReadOnlyList<string> rowAdapters) => lora.UseAdapterPerRow(rowAdapters);

    public IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay) => lora.ParameterGroups(learningRate, weightDecay);

    public void SetTraining(bool training) => this.training = training;

    public IReadOnlyDictionary<string, Tensor> StateDict() => lora.StateDict();

    /// <summary>PEFT's files (loadable by Python PEFT as LoRA with modules_to_save) plus longlora_config.json.</summary>
    public void Save(string directory)
    {
        lora.Save(directory);
        options.Save(directory);
    }

    public bool CanMerge => true;

    public void Merge() => lora.Merge();

    public void Unmerge() => lora.Unmerge();

    public long ModelParameterCount => lora.ModelParameterCount;

    public string TrainableParametersReport() => lora.TrainableParametersReport();

    /// <summary>Restores the model's attention and returns the plain model with the merged weights (the norms and embeddings trained in full stay).</summary>
    public IAdaptableModel MergeAndUnload()
    {
        RestoreAttention();
        return lora.MergeAndUnload();
    }

    /// <summary>Restores the model's attention and the base layers, embeddings and norms.</summary>
    public IAdaptableModel Unload()
    {
        RestoreAttention();
        return lora.Unload();
    }

    // The model's own attention comes back unless another method replaced it since.
    private void RestoreAttention()
    {
        if (unloaded) throw new InvalidOperationException("this LongLoRA adapter was unloaded: the model is a plain model again");
        unloaded = true;
        if (ReferenceEquals(model.Attention, shifted)) model.Attention = original;
    }

    /// <summary>Unloads (as <see cref="Unload"/>) unless that already happened.</summary>
    public void Dispose()
    {
        if (!unloaded) Unload();
    }
}
