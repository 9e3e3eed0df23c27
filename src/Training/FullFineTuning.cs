using LoRAHub.Abstractions;
using LoRAHub.Torch;
using LoRAHub.Torch.Optim;

namespace LoRAHub.Training;

/// <summary>
/// Trains every parameter: the baseline the PEFT methods are measured against, and what pretraining uses.
/// Built in (not a plugin) so that recipes that make base models need no method plugin.
/// </summary>
public sealed class FullFineTuning : AdapterMethod<FullFineTuningOptions>
{
    public override string Name => "full";
    public override string Description => "full fine-tuning: every parameter trains (baseline, pretraining)";

    public override IAdapter Attach(IAdaptableModel model, FullFineTuningOptions options) => new Adapter(this, model, options);

    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var weights = torch.load_safetensors(Path.Combine(directory, "model.safetensors"), model.Device);
        try { model.Root.load_state_dict(weights); }
        finally { foreach (var t in weights.Values) t.Dispose(); }
        return new Adapter(this, model, new FullFineTuningOptions());
    }

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
            var all = model.Root.named_parameters().Where(p => p.parameter.requires_grad).ToList();
            bool NoDecay((string name, Tensor parameter) p) => p.parameter.dim() < 2;
            return [new ParamGroup(all.Where(p => !NoDecay(p)).Select(p => p.parameter), learningRate, weightDecay, "decay"),
                    new ParamGroup(all.Where(NoDecay).Select(p => p.parameter), learningRate, 0, "no_decay")];
        }

        public IReadOnlyDictionary<string, Tensor> StateDict() => model.Root.state_dict();

        public void Save(string directory)
        {
            Directory.CreateDirectory(directory);
            torch.save_safetensors(model.Root.state_dict(), Path.Combine(directory, "model.safetensors"));
        }

        public void Dispose() { }
    }
}

public sealed class FullFineTuningOptions;
