using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Abstractions;

/// <summary>
/// A method applied to one model. Every hook has a default so that each method implements only what it uses:
/// layer-injecting methods (LoRA, DoRA, AdaLoRA) provide parameters, merge and save; weight-transforming methods
/// (QLoRA) do their work in Attach; optimizer-side methods (GaLore) return an optimizer; attention-changing
/// methods (LongLoRA) set <see cref="IAdaptableModel.Attention"/>; scheduled methods (AdaLoRA) use the step hooks.
/// </summary>
public interface IAdapter : IDisposable
{
    IAdapterMethod Method { get; }

    /// <summary>The options in force (the typed object).</summary>
    object Options { get; }

    /// <summary>Trainable parameters by optimizer group (e.g. LoRA+ puts B matrices in a group with a larger lr).</summary>
    IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay);

    /// <summary>The optimizer to use, or null for the trainer's default AdamW over <see cref="ParameterGroups"/>.</summary>
    Optimizer? CreateOptimizer(IReadOnlyList<ParamGroup> groups, OptimizerSettings settings) => null;

    /// <summary>Called before each optimizer step's forward pass (step counts from 0).</summary>
    void OnStepBegin(long step) { }

    /// <summary>A term added to the loss, e.g. AdaLoRA's orthogonality regulariser; null for none.</summary>
    Tensor? AuxiliaryLoss() => null;

    /// <summary>Called after backward and before the optimizer step (gradients are available).</summary>
    void OnAfterBackward(long step) { }

    /// <summary>Called after the optimizer step (e.g. AdaLoRA's rank allocation, GaLore's projector refresh).</summary>
    void OnStepEnd(long step) { }

    /// <summary>Training or inference mode; LongLoRA uses it to switch between shifted-sparse and full attention.</summary>
    void SetTraining(bool training) { }

    /// <summary>The adapter's state (PEFT key names where PEFT has the method).</summary>
    IReadOnlyDictionary<string, Tensor> StateDict();

    /// <summary>Writes the adapter to a folder (PEFT's format where PEFT has the method); atomic per file.</summary>
    void Save(string directory);

    /// <summary>
    /// Training state that lives outside the trainable tensors and the optimizer (AdaLoRA's importance averages and fixed
    /// rank pattern): the trainer saves it with every checkpoint and hands it to <see cref="LoadTrainingState"/> at
    /// Resume, so a resumed run continues exactly. None by default.
    /// </summary>
    IReadOnlyDictionary<string, Tensor> TrainingState() => new Dictionary<string, Tensor>();

    /// <summary>Puts back what <see cref="TrainingState"/> saved (an empty set for a checkpoint written without any).</summary>
    void LoadTrainingState(IReadOnlyDictionary<string, Tensor> state) { }

    /// <summary>
    /// Whether the adapter can be folded into the base weights: <see cref="MergeAndUnload"/> works, and so does an in-place
    /// <see cref="Merge"/> unless the base is 4-bit.
    /// </summary>
    bool CanMerge => false;

    /// <summary>
    /// Folds the adapter into the base weights in place (exact within float tolerance); <see cref="Unmerge"/> undoes it.
    /// Refused where it would not be reversible (a 4-bit base: use <see cref="MergeAndUnload"/>).
    /// </summary>
    void Merge() => throw new NotSupportedException($"{Method.Name} cannot be merged into the base weights");

    void Unmerge() => throw new NotSupportedException($"{Method.Name} cannot be unmerged");

    /// <summary>
    /// PEFT's merge_and_unload: folds the adapter into the base weights and returns the plain model, the adapter layers
    /// replaced by ordinary base layers holding the merged weights (for a causal LM, PretrainedModel.Save then writes an
    /// ordinary Hugging Face folder). The adapter is spent afterwards. The model is the same object the adapter was
    /// attached to; <see cref="AdapterExtensions.MergeAndUnload{TModel}"/> returns it typed.
    /// </summary>
    IAdaptableModel MergeAndUnload() => throw new NotSupportedException($"{Method.Name} cannot be merged into the base weights");

    /// <summary>PEFT's unload: the plain model back with its base weights, the adapter dropped (nothing merged).</summary>
    IAdaptableModel Unload() => throw new NotSupportedException($"{Method.Name} cannot be unloaded: it changes the base weights themselves");

    /// <summary>With false, the model computes exactly its base output.</summary>
    bool Enabled { get; set; }

    /// <summary>
    /// PEFT's disable_adapter context: the model computes its base output until the returned scope is disposed, then
    /// the adapter is enabled again if it was before (<c>using (adapter.DisableAdapter()) { ... }</c>).
    /// </summary>
    IDisposable DisableAdapter()
    {
        var wasEnabled = Enabled;
        Enabled = false;
        return new EnabledRestorer(this, wasEnabled);
    }

    /// <summary>A one-line PEFT-style report: trainable params, all params, trainable %.</summary>
    string TrainableParametersReport()
    {
        var trainable = ParameterGroups(0, 0).SelectMany(g => g.Parameters).Sum(p => p.numel());
        return TrainableReport.Format(trainable, ModelParameterCount);
    }

    /// <summary>Number of parameters in the model (base plus adapter).</summary>
    long ModelParameterCount { get; }
}

/// <summary>Sets <see cref="IAdapter.Enabled"/> back once (the scope <see cref="IAdapter.DisableAdapter"/> returns).</summary>
internal sealed class EnabledRestorer(IAdapter adapter, bool enabled) : IDisposable
{
    private bool done;

    public void Dispose()
    {
        if (done) return;
        done = true;
        adapter.Enabled = enabled;
    }
}

/// <summary>Typed forms of the contract's members, and its default members reachable from an adapter's own class.</summary>
public static class AdapterExtensions
{
    /// <summary><see cref="IAdapter.DisableAdapter"/> on a variable of the adapter's class (default interface members need the interface).</summary>
    public static IDisposable DisableAdapter(this IAdapter adapter) => adapter.DisableAdapter();

    /// <summary><see cref="IAdapter.MergeAndUnload"/> as the model's own type, e.g. <c>adapter.MergeAndUnload&lt;ICausalLanguageModel&gt;()</c>.</summary>
    public static TModel MergeAndUnload<TModel>(this IAdapter adapter) where TModel : IAdaptableModel => adapter.MergeAndUnload() switch
    {
        TModel typed => typed,
        var other => throw new InvalidCastException($"the merged model is a {other.GetType().Name}, not a {typeof(TModel).Name}"),
    };
}

public sealed record OptimizerSettings(double LearningRate, double WeightDecay, double Beta1 = 0.9, double Beta2 = 0.999, double Eps = 1e-8);

public static class TrainableReport
{
    /// <summary>PEFT's print_trainable_parameters line.</summary>
    public static string Format(long trainable, long total) =>
        string.Create(System.Globalization.CultureInfo.InvariantCulture,
            $"trainable params: {trainable:N0} || all params: {total:N0} || trainable%: {(total == 0 ? 0 : 100.0 * trainable / total):0.0000}");
}
