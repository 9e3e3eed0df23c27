using System.Text.RegularExpressions;
using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using Linear = TorchSharp.Modules.Linear;
using static TorchSharp.torch;

[assembly: AdapterPlugin(ContractVersion.Major, ContractVersion.Minor)]

namespace LoRAHub.Plugins.GaLore;

/// <summary>
/// GaLore (Zhao et al. 2024): trains every weight, but keeps Adam's moments for the targeted 2-D weights in a rank-r
/// projection of their gradients, refreshed from an SVD every update_proj_gap steps. It adds no layers, so it works
/// entirely through <see cref="IAdapter.CreateOptimizer"/>.
/// </summary>
public sealed class GaLoreMethod : AdapterMethod<GaLoreOptions>
{
    public override string Name => "galore";
    public override string Description => "GaLore: full-parameter training with low-rank projected optimizer state";
    /// <summary>Loading writes the saved weights over the base ones: there is no separate adapter to disable or unload.</summary>
    public override bool ChangesBaseWeights => true;

    public override IAdapter Attach(IAdaptableModel model, GaLoreOptions options)
    {
        options.Validate();
        return new GaLoreAdapter(this, model, options);
    }

    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var configPath = Path.Combine(directory, GaLoreAdapter.ConfigFile);
        if (!File.Exists(configPath)) throw new FileNotFoundException($"{directory} is not a GaLore save: {GaLoreAdapter.ConfigFile} is missing", configPath);
        var options = ConfigFile.Read<GaLoreOptions>(configPath);
        options.Validate();
        var weights = torchx.load_safetensors(Path.Combine(directory, GaLoreAdapter.WeightsFile), model.Device);
        try
        {
            // TorchSharp's load_state_dict would broadcast a wrong shape into the weight: check first.
            var own = model.Root.state_dict();
            foreach (var (key, value) in weights)
                if (own.TryGetValue(key, out var target) && !value.shape.SequenceEqual(target.shape))
                    throw new InvalidOperationException($"shape mismatch for '{key}': the GaLore save has [{string.Join(", ", value.shape)}], " +
                                                        $"the model expects [{string.Join(", ", target.shape)}]; was it saved from another model?");
            model.Root.load_state_dict(weights, strict: false);
        }
        finally
        {
            foreach (var t in weights.Values) t.Dispose();
        }
        return new GaLoreAdapter(this, model, options);
    }

    /// <summary>A folder with galore_config.json.</summary>
    public override bool Claims(string directory) => File.Exists(Path.Combine(directory, GaLoreAdapter.ConfigFile));
}

/// <summary>GaLore applied to a model: every parameter trainable, the targeted weights projected in the optimizer.</summary>
public sealed class GaLoreAdapter : IAdapter
{
    internal const string ConfigFile = "galore_config.json";
    internal const string WeightsFile = "model.safetensors";
    private readonly IAdaptableModel model;
    private readonly GaLoreOptions options;

    internal GaLoreAdapter(IAdapterMethod method, IAdaptableModel model, GaLoreOptions options)
    {
        Method = method;
        this.model = model;
        this.options = options;
        model.Root.requires_grad_(true);
        // The reference selects every Linear whose name contains one of the strings ("attn", "mlp"), never the output head.
        var selection = new TargetSelection
        {
            TargetModules = TargetModuleSpec.FromPattern($".*({string.Join("|", options.target_modules.Select(Regex.Escape))}).*"),
            ExcludeModules = model.OutputModuleNames.Count > 0 ? TargetModuleSpec.FromNames(model.OutputModuleNames) : null,
        };
        Projected = TargetResolver.Resolve(model, selection, "GaLore", skipOthers: true)
            .Select(path => model.Root.get_submodule(path)).OfType<Linear>().Select(l => (Tensor)l.weight).ToList();
        if (Projected.Count == 0)
            throw TargetResolver.Bad("GaLore", "target_modules", $"[{string.Join(", ", options.target_modules)}] selects no dense Linear layer " +
                $"(GaLore projects nn.Linear weights). Linear layers here: {TargetResolver.DescribeLinears(model.Root)}");
    }

    public IAdapterMethod Method { get; }
    public object Options => options;
    public IReadOnlyList<Tensor> Projected { get; }
    public long ModelParameterCount => model.Root.parameters().Sum(p => p.numel());

    public bool Enabled
    {
        get => true;
        set
        {
            if (!value) throw new NotSupportedException("GaLore trains the base weights themselves; there is no separate adapter to disable");
        }
    }

    public IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay)
    {
        var projected = new HashSet<Tensor>(Projected, ReferenceEqualityComparer.Instance);
        var all = model.Root.parameters().Where(p => p.requires_grad).ToList();
        return [new ParamGroup(all.Where(projected.Contains), learningRate, weightDecay, "galore"),
                new ParamGroup(all.Where(p => !projected.Contains(p)), learningRate, weightDecay, "adamw")];
    }

    public Optimizer? CreateOptimizer(IReadOnlyList<ParamGroup> groups, OptimizerSettings settings) =>
        new GaLoreAdamW(groups.Where(g => g.Parameters.Count > 0), Projected, options, settings.Beta1, settings.Beta2, settings.Eps);

    public IReadOnlyDictionary<string, Tensor> StateDict() => model.Root.state_dict();

    /// <summary>Saves the trained model weights (GaLore changes them all) and the options.</summary>
    public void Save(string directory)
    {
        Directory.CreateDirectory(directory);
        Tuners.ConfigFile.Write(Path.Combine(directory, ConfigFile), options, ConfigFields.Of(typeof(GaLoreOptions)));
        AdapterWeightsFile.Write(Path.Combine(directory, WeightsFile), model.Root.state_dict(), floatingPointOnly: false);
    }

    /// <summary>The base weights were trained in place: the model is already the merged one.</summary>
    public IAdaptableModel MergeAndUnload() => model;

    // `loraHub merge` writes the trained weights as a model folder of their own (what serve needs: it cannot serve them
    // beside the base model).
    public bool CanMerge => true;

    /// <summary>Nothing to fold: the weights are trained in place (there is nothing to unmerge either).</summary>
    public void Merge() { }

    public void Dispose() { }
}
