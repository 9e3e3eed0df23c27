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

    bool CanMerge => false;

    /// <summary>Folds the adapter into the base weights (exact within float tolerance).</summary>
    void Merge() => throw new NotSupportedException($"{Method.Name} cannot be merged into the base weights");

    void Unmerge() => throw new NotSupportedException($"{Method.Name} cannot be unmerged");

    /// <summary>With false, the model computes exactly its base output.</summary>
    bool Enabled { get; set; }

    /// <summary>A one-line PEFT-style report: trainable params, all params, trainable %.</summary>
    string TrainableParametersReport()
    {
        var trainable = ParameterGroups(0, 0).SelectMany(g => g.Parameters).Sum(p => p.numel());
        return TrainableReport.Format(trainable, ModelParameterCount);
    }

    /// <summary>Number of parameters in the model (base plus adapter).</summary>
    long ModelParameterCount { get; }
}

public sealed record OptimizerSettings(double LearningRate, double WeightDecay, double Beta1 = 0.9, double Beta2 = 0.999, double Eps = 1e-8);

public static class TrainableReport
{
    /// <summary>PEFT's print_trainable_parameters line.</summary>
    public static string Format(long trainable, long total) =>
        string.Create(System.Globalization.CultureInfo.InvariantCulture,
            $"trainable params: {trainable:N0} || all params: {total:N0} || trainable%: {(total == 0 ? 0 : 100.0 * trainable / total):0.0000}");
}
