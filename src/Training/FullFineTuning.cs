using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Optim;
using LoRAHub.Tuners;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Training;

/// <summary>
/// Trains every parameter: the baseline the PEFT methods are measured against, and what pretraining uses.
/// Built in (not a plugin) so that recipes that make base models need no method plugin; the host registers it
/// as the method named "full".
/// </summary>
public sealed class FullFineTuning : AdapterMethod<FullFineTuningOptions>
{
    public const string WeightsFile = "model.safetensors";

    public FullFineTuning() { }

    public override string Name => "full";
    public override string Description => "full fine-tuning: every parameter trains (baseline, pretraining)";
    /// <summary>Loading writes the saved weights over the base ones: there is no separate adapter to disable or unload.</summary>
    public override bool ChangesBaseWeights => true;

    public override IAdapter Attach(IAdaptableModel model, FullFineTuningOptions options) => new Adapter(this, model, options);

    /// <summary>Loads weights saved by <see cref="IAdapter.Save"/>: every tensor of the model, by name and shape.</summary>
    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var path = Path.Combine(directory, WeightsFile);
        if (!File.Exists(path))
            throw new AdapterConfigurationException($"{directory} holds no {WeightsFile}; it was not saved by full fine-tuning");
        var weights = torchx.load_safetensors(path, model.Device);
        try
        {
            var own = model.Root.state_dict();
            var missing = own.Keys.Where(k => !weights.ContainsKey(k)).ToList();
            var unexpected = weights.Keys.Where(k => !own.ContainsKey(k)).ToList();
            if (missing.Count > 0 || unexpected.Count > 0)
                throw new AdapterConfigurationException(
                    $"{path} does not match the model ({model.ModelType}): missing [{Names(missing)}], unexpected [{Names(unexpected)}]. " +
                    "Load it onto the model it was trained from.");
            using (torch.no_grad())
            {
                foreach (var (name, target) in own)
                {
                    var value = weights[name];
                    if (!value.shape.SequenceEqual(target.shape))
                        throw new AdapterConfigurationException(
                            $"{path}: '{name}' has shape [{string.Join(", ", value.shape)}] but the model has [{string.Join(", ", target.shape)}]");
                    target.copy_(value);
                }
            }
        }
        finally
        {
            foreach (var t in weights.Values) t.Dispose();
        }
        return new Adapter(this, model, new FullFineTuningOptions());
    }

    /// <summary>A folder holding model.safetensors and no adapter or method config (what <see cref="IAdapter.Save"/> writes here).</summary>
    public override bool Claims(string directory) =>
        File.Exists(Path.Combine(directory, WeightsFile)) && !File.Exists(Path.Combine(directory, AdapterFolder.PeftConfigFile)) &&
        AdapterFolder.MethodConfigFiles(directory).Count == 0;

    private static string Names(List<string> keys) => string.Join(", ", keys.Take(10)) + (keys.Count > 10 ? ", ..." : "");

    private sealed class Adapter : IAdapter
    {
        private readonly IAdaptableModel model;

        public Adapter(IAdapterMethod method, IAdaptableModel model, FullFineTuningOptions options)
        {
            Method = method;
            Options = options;
            this.model = model;
            model.Root.requires_grad_(true);
        }

        public IAdapterMethod Method { get; }
        public object Options { get; }
        public long ModelParameterCount => model.Root.parameters().Sum(p => p.numel());

        public bool Enabled
        {
            get => true;
            set
            {
                if (!value) throw new NotSupportedException("full fine-tuning changes the base weights; there is no adapter to disable");
            }
        }

        public IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay)
        {
            // No weight decay on norms and biases, as is usual for transformers.
            var all = model.Root.named_parameters().Where(p => p.parameter.requires_grad).Select(p => (Tensor)p.parameter).ToList();
            static bool NoDecay(Tensor p) => p.dim() < 2;
            return [new ParamGroup(all.Where(p => !NoDecay(p)), learningRate, weightDecay, "decay"),
                    new ParamGroup(all.Where(NoDecay), learningRate, 0, "no_decay")];
        }

        public IReadOnlyDictionary<string, Tensor> StateDict() => model.Root.state_dict();

        public void Save(string directory)
        {
            Directory.CreateDirectory(directory);
            AdapterWeightsFile.Write(Path.Combine(directory, WeightsFile), model.Root.state_dict(), floatingPointOnly: false);
        }

        /// <summary>Every weight trained in place: the model is already the merged one.</summary>
        public IAdaptableModel MergeAndUnload() => model;

        // `loraHub merge` writes the trained weights as a model folder of their own (what serve needs: it cannot serve
        // them beside the base model).
        public bool CanMerge => true;

        /// <summary>Nothing to fold: the weights are trained in place (there is nothing to unmerge either).</summary>
        public void Merge() { }

        public void Dispose() { }
    }
}

/// <summary>Full fine-tuning has no options of its own; the trainer's (learning rate, weight decay) apply.</summary>
public sealed class FullFineTuningOptions;
