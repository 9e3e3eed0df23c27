using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.MALoRA;

/// <summary>MALoRA on one model: the expert layers, the router's load-balancing loss, save and load.</summary>
public sealed class MaLoraAdapter : BaseTuner<MaLoraLinear>
{
    private readonly MaLoraOptions options;

    internal MaLoraAdapter(IAdapterMethod method, IAdaptableModel model, MaLoraOptions options) : base(method, model)
    {
        this.options = options;
        options.TargetModules ??= TargetModuleSpec.FromNames(MaLoraOptions.DefaultTargets);
        var targets = TargetResolver.EffectiveTargets(model, options.TargetModules, "MALoRA");
        var paths = TargetResolver.Resolve(model, options.Selection(targets), "MALoRA");
        FreezeBase();
        InjectAll(paths, (_, b) => new MaLoraLinear(b, options));
    }

    public override object Options => options;

    public override IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay) =>
        [new ParamGroup(Layers.Values.SelectMany(l => new[] { l.S, l.P, l.B, l.Router }), learningRate, weightDecay, "decay")];

    /// <summary>router_aux_loss_coef · mean over layers of their load-balancing terms from the last forward (training only).</summary>
    public override Tensor? AuxiliaryLoss()
    {
        var terms = Layers.Values.Select(l => l.LastBalanceLoss).Where(t => t is not null).Cast<Tensor>().ToList();
        if (!Enabled || terms.Count == 0) return null;
        using var scope = torch.NewDisposeScope();
        return torch.stack(terms).mean().mul(options.RouterAuxLossCoef).MoveToOuterDisposeScope();
    }

    public override IReadOnlyDictionary<string, Tensor> StateDict() =>
        Layers.SelectMany(l => new[] { ("lora_S", l.Value.S), ("lora_P", l.Value.P), ("lora_B", l.Value.B), ("router", l.Value.Router) }
            .Select(p => (key: PeftKeys.Parameter($"{l.Key}.{p.Item1}.weight"), tensor: p.Item2))).ToDictionary(p => p.key, p => p.tensor);

    /// <summary>adapter_model.safetensors (the experts, routers and shared subspaces) and malora_config.json (the options).</summary>
    public override void Save(string directory)
    {
        Directory.CreateDirectory(directory);
        AdapterWeightsFile.Write(Path.Combine(directory, AdapterWeightsFile.FileName), StateDict());
        ConfigFile.Write(Path.Combine(directory, MaLoraOptions.ConfigFileName), options, ConfigFields.Of(typeof(MaLoraOptions)));
    }

    /// <summary>Routing depends on the input, so the experts cannot be folded into the base weight.</summary>
    public override bool CanMerge => false;
}
