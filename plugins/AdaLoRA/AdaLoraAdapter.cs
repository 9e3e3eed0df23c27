using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Importance;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.AdaLoRA;

/// <summary>
/// AdaLoRA on one model: SVD-shaped adapters on the target Linears, the orthogonality regulariser as an auxiliary loss,
/// importance tracking after each backward and budget masking after each optimizer step (PEFT's update_and_allocate).
/// </summary>
public sealed class AdaLoraAdapter : BaseTuner<SvdLinear>
{
    private readonly AdaLoraOptions options;
    private readonly RankAllocator allocator;

    /// <summary>Wraps the target Linears (in model order) with the saved <paramref name="ranks"/> where given, else init_r each.</summary>
    internal AdaLoraAdapter(IAdapterMethod method, IAdaptableModel model, AdaLoraOptions options, IReadOnlyDictionary<string, int>? ranks = null)
        : base(method, model)
    {
        this.options = options;
        // The effective targets (defaults applied, all-linear expanded) are what adapter_config.json records.
        options.TargetModules = TargetResolver.EffectiveTargets(model, options.TargetModules, "AdaLoRA");
        var paths = TargetResolver.Resolve(model, options.Selection(options.TargetModules), "AdaLoRA");
        FreezeBase();
        InjectAll(paths, (path, b) => new SvdLinear(b, ranks?.GetValueOrDefault(path, options.InitR) ?? options.InitR, options.LoraAlpha, options.LoraDropout)
        {
            RankNum = options.InitR,
        });
        allocator = new RankAllocator(Layers.Values.ToList(), options);
    }

    public override object Options => options;

    public RankAllocator Allocator => allocator;

    public override IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay)
    {
        var matrices = Layers.Values.SelectMany(l => new[] { l.A, l.B }).ToList();
        var values = Layers.Values.Select(l => l.E).ToList();
        return [new ParamGroup(matrices, learningRate, weightDecay, "decay"), new ParamGroup(values, learningRate, 0.0, "no_decay")];
    }

    /// <summary>orth_reg_weight · mean over A and B of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (PEFT adds it to the loss in training).</summary>
    public override Tensor? AuxiliaryLoss()
    {
        if (!Enabled || options.OrthRegWeight == 0 || Layers.Count == 0 || !Model.Root.training) return null;
        using var scope = torch.NewDisposeScope();
        Tensor? total = null;
        foreach (var l in Layers.Values)
            foreach (var cov in new[] { l.A.matmul(l.A.t()), l.B.t().matmul(l.B) })
            {
                var term = cov.sub(torch.eye(cov.size(0), dtype: cov.dtype, device: cov.device)).pow(2).sum().sqrt();
                total = total is null ? term : total + term;
            }
        return total!.mul(options.OrthRegWeight / (2.0 * Layers.Count)).MoveToOuterDisposeScope();
    }

    /// <summary>Smooths the sensitivities while the budget is still moving (gradients are there now).</summary>
    public override void OnAfterBackward(long step)
    {
        if (step < options.TotalStep!.Value - options.Tfinal) allocator.UpdateImportance();
    }

    /// <summary>Masks to the scheduled budget; fixes the pattern at total_step − tfinal and keeps it after.</summary>
    public override void OnStepEnd(long step)
    {
        var final = options.TotalStep!.Value - options.Tfinal;
        if (step < final)
        {
            var (budget, mask) = allocator.BudgetSchedule(step);
            if (mask) Record(allocator.MaskToBudget(budget));
        }
        else if (step == final)
        {
            Record(allocator.MaskToBudget(allocator.BudgetSchedule(step).budget));
            allocator.ResetImportance();
        }
        else if (options.RankPattern is not null)
        {
            allocator.MaskWithPattern(Layers.Keys.Select(path => options.RankPattern[PatternKey(path)]).ToArray());
        }
    }

    private void Record(bool[][] pattern) =>
        options.RankPattern = Layers.Keys.Select((path, i) => (PatternKey(path), pattern[i])).ToDictionary(p => p.Item1, p => p.Item2);

    /// <summary>Triplets in use per layer (E ≠ 0 or never masked), the effective ranks.</summary>
    public IReadOnlyDictionary<string, int> EffectiveRanks() =>
        Layers.ToDictionary(l => l.Key, l => options.RankPattern?.TryGetValue(PatternKey(l.Key), out var keep) == true ? keep.Count(k => k) : l.Value.Rank);

    internal static string PatternKey(string path) => path + ".lora_E";

    /// <summary>The importance averages (while the budget falls) and the rank pattern (once masked), for checkpoints.</summary>
    public override IReadOnlyDictionary<string, Tensor> TrainingState()
    {
        var state = allocator.Importance.Save(Tracked());
        if (options.RankPattern is { } pattern)
            foreach (var (key, keep) in pattern) state[$"rank_pattern.{key}"] = BudgetMask.ToTensor(keep);
        return state;
    }

    public override void LoadTrainingState(IReadOnlyDictionary<string, Tensor> state)
    {
        allocator.Importance.Load(Tracked(), state);
        var pattern = Layers.Keys.Select(PatternKey).Where(k => state.ContainsKey($"rank_pattern.{k}"))
            .ToDictionary(k => k, k => BudgetMask.ToArray(state[$"rank_pattern.{k}"]));
        if (pattern.Count > 0) options.RankPattern = pattern;
    }

    private IEnumerable<KeyValuePair<string, Tensor>> Tracked() => Layers.SelectMany(l => SensitivityEma.Named(l.Key, l.Value.A, l.Value.E, l.Value.B));

    public override IReadOnlyDictionary<string, Tensor> StateDict() => AdaLoraFiles.StateDict(Layers, options.RankPattern);

    public override void Save(string directory) => AdaLoraFiles.Save(directory, Layers, options, Model.NameOrPath);

    /// <summary>The importance statistics go with the layers.</summary>
    protected override void OnUnloaded(bool merged) => allocator?.Dispose();
}
