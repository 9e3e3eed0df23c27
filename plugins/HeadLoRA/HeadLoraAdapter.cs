using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Optim;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Importance;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.HeadLoRA;

/// <summary>
/// Multi-head-aware LoRA on one model: per-head adapters on the attention projections, plain LoRA on other targets, and
/// in adaptive mode the head-level rank budget (importance after each backward, masking after each step, as AdaLoRA).
/// Saves its own folder (headlora_config.json with the final per-head ranks) or, <see cref="SavePeftLora"/>, PEFT's LoRA.
/// </summary>
public sealed class HeadLoraAdapter : BaseTuner<HeadLoraLinear>
{
    private readonly HeadLoraOptions options;
    private readonly HeadRankAllocator? allocator;
    private readonly int headDim;

    /// <summary><paramref name="loaded"/>: the layers take the saved per-head ranks and the budget is not run again.</summary>
    internal HeadLoraAdapter(IAdapterMethod method, IAdaptableModel model, HeadLoraOptions options, bool loaded = false) : base(method, model)
    {
        this.options = options;
        options.TargetModules = TargetResolver.EffectiveTargets(model, options.TargetModules ?? TargetModuleSpec.FromNames(HeadLoraOptions.DefaultTargets), "HeadLoRA");
        var paths = TargetResolver.Resolve(model, options.Selection(options.TargetModules), "HeadLoRA");
        HeadSplit SplitOf(string path)
        {
            var name = TargetResolver.LastName(path);
            return options.HeadOutputModules.Contains(name) ? HeadSplit.Output : options.HeadInputModules.Contains(name) ? HeadSplit.Input : HeadSplit.None;
        }
        headDim = paths.Any(p => SplitOf(p) != HeadSplit.None) ? HeadGeometry.HeadDim(model, options) : 0;
        FreezeBase();
        InjectAll(paths, (path, b) =>
        {
            var linear = LinearLayer.From(b)!;
            var ranks = options.HeadRanks.TryGetValue(path, out var exact) ? exact : options.HeadRanksFor(path);
            var layout = HeadLayout.For(path, SplitOf(path), linear.in_features, linear.out_features, headDim, ranks,
                options.Adaptive ? options.InitR : options.R);
            return new HeadLoraLinear(b, layout, options.LoraAlpha, options.LoraDropout, options.UseRslora, options.Adaptive ? options.InitR : null);
        });
        if (Layers.Values.All(l => l.Layout.Rank == 0))
        {
            Unload();
            throw HeadLoraOptions.Bad("r", "and head_ranks give every head rank 0: nothing to train");
        }
        if (options.Adaptive && !loaded)
        {
            allocator = new HeadRankAllocator(Layers.Values.ToList(), options);
            if (allocator.Schedule.Target > allocator.Schedule.Initial)
            {
                Unload();
                throw HeadLoraOptions.Bad("target_r", $"({options.TargetR} per head) asks for {allocator.Schedule.Target} components, more than the " +
                    $"{allocator.Schedule.Initial} the heads start with; lower target_r or raise init_r/head_ranks");
            }
        }
    }

    public override object Options => options;

    /// <summary>The adaptive budget (null when not adaptive, or for a loaded adapter).</summary>
    public HeadRankAllocator? Allocator => allocator;

    public override IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay)
    {
        var matrices = Layers.Values.SelectMany(l => new Tensor[] { l.A, l.B }).ToList();
        var values = Layers.Values.Select(l => l.E).OfType<Tensor>().ToList();
        return values.Count == 0
            ? [new ParamGroup(matrices, learningRate, weightDecay, "decay")]
            : [new ParamGroup(matrices, learningRate, weightDecay, "decay"), new ParamGroup(values, learningRate, 0.0, "no_decay")];
    }

    public override void OnAfterBackward(long step)
    {
        if (allocator is not null && step < allocator.Schedule.FinalStep) allocator.UpdateImportance();
    }

    /// <summary>Masks to the scheduled budget; at total_step − tfinal the per-head ranks are fixed and kept from then on.</summary>
    public override void OnStepEnd(long step)
    {
        if (allocator is null) return;
        var final = allocator.Schedule.FinalStep;
        if (step < final)
        {
            var (budget, mask) = allocator.Schedule.At(step);
            if (mask) allocator.MaskToBudget(budget);
        }
        else if (step == final)
        {
            allocator.MaskToBudget(allocator.Schedule.At(step).budget);
            allocator.ResetImportance();
        }
        else allocator.ApplyMasks();
    }

    /// <summary>In adaptive mode the importance averages (while the budget falls) and each layer's kept components, for checkpoints.</summary>
    public override IReadOnlyDictionary<string, Tensor> TrainingState()
    {
        if (allocator is null) return new Dictionary<string, Tensor>();
        var state = allocator.Importance.Save(Tracked());
        foreach (var (path, layer) in Layers)
            if (layer.Keep is { } keep) state[$"keep.{path}"] = BudgetMask.ToTensor(keep);
        return state;
    }

    public override void LoadTrainingState(IReadOnlyDictionary<string, Tensor> state)
    {
        if (allocator is null) return;
        allocator.Importance.Load(Tracked(), state);
        foreach (var (path, layer) in Layers)
            if (state.TryGetValue($"keep.{path}", out var keep)) layer.Keep = BudgetMask.ToArray(keep);
    }

    private IEnumerable<KeyValuePair<string, Tensor>> Tracked() => Layers.SelectMany(l => SensitivityEma.Named(l.Key, l.Value.A, l.Value.E, l.Value.B));

    /// <summary>Rank of each head's adapter by module path (after adaptive masking: the components kept).</summary>
    public IReadOnlyDictionary<string, int[]> EffectiveHeadRanks() => Layers.ToDictionary(l => l.Key, l => l.Value.EffectiveRanks());

    /// <summary>Indices of the kept components of a layer, or null when all are kept.</summary>
    private static Tensor? KeptIndex(HeadLoraLinear l) =>
        l.Keep is { } keep && keep.Any(k => !k)
            ? torch.tensor(keep.Select((k, i) => (k, i)).Where(p => p.k).Select(p => (long)p.i).ToArray(), device: l.A.device)
            : null;

    /// <summary>
    /// base_model.model.&lt;path&gt;.lora_A / lora_B (packed by head) and lora_E (adaptive), masked components dropped. The
    /// live tensors when nothing is masked (so loading writes into the layers).
    /// </summary>
    public override IReadOnlyDictionary<string, Tensor> StateDict()
    {
        var result = new Dictionary<string, Tensor>();
        foreach (var (path, l) in Layers)
        {
            Tensor a = l.A, b = l.B;
            Tensor? e = l.E;
            if (KeptIndex(l) is { } idx) (a, b, e) = (a.index_select(0, idx), b.index_select(1, idx), e?.index_select(0, idx));
            result[PeftKeys.Parameter($"{path}.lora_A")] = a;
            result[PeftKeys.Parameter($"{path}.lora_B")] = b;
            if (e is not null) result[PeftKeys.Parameter($"{path}.lora_E")] = e;
        }
        return result;
    }

    /// <summary>save_format "headlora": adapter_model.safetensors and headlora_config.json (final per-head ranks by path); "lora": <see cref="SavePeftLora"/>.</summary>
    public override void Save(string directory)
    {
        if (options.SaveFormat == "lora")
        {
            SavePeftLora(directory);
            return;
        }
        Directory.CreateDirectory(directory);
        using (torch.NewDisposeScope())
            AdapterWeightsFile.Write(Path.Combine(directory, AdapterWeightsFile.FileName), StateDict());
        var config = new Dictionary<string, object?>();
        ConfigFields.WriteTo(options, ConfigFields.Of(typeof(HeadLoraOptions)), config);
        config["head_ranks"] = EffectiveHeadRanks().ToDictionary(p => p.Key, p => p.Value.ToList());
        if (headDim > 0) config["head_dim"] = headDim; // as resolved (option or model config), so the folder says it
        config["base_model_name_or_path"] = Model.NameOrPath;
        ConfigFile.Write(Path.Combine(directory, HeadLoraOptions.ConfigFileName), config);
    }

    /// <summary>
    /// Writes the adapter as a plain PEFT LoRA folder (peft_type LORA): each layer's update is the LoRA pair of
    /// <see cref="HeadLoraLinear.ExpandedLora"/> at rank Σ r_h (kept components only), its scale folded into lora_B, and
    /// lora_alpha = r per module (rank_pattern and alpha_pattern by path), so PEFT's scale α/r is 1. Python PEFT and the
    /// "lora" method load it with this adapter's outputs; the head structure itself is not recorded.
    /// </summary>
    public void SavePeftLora(string directory) => PeftLoraExport.Save(directory, Layers, KeptIndex, options, Model.NameOrPath);

    protected override void OnUnloaded(bool merged) => allocator?.Dispose();
}
