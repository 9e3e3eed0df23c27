using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.AdaLoRA;

/// <summary>
/// AdaLoRA on one model: SVD-shaped adapters on the target Linears, the orthogonality regulariser as an auxiliary loss,
/// importance tracking after each backward and budget masking after each optimizer step (PEFT's update_and_allocate).
/// </summary>
public sealed class AdaLoraAdapter : IAdapter
{
    private readonly IAdaptableModel model;
    private readonly AdaLoraOptions options;
    private readonly List<(string path, SvdLinear layer)> layers;
    private readonly RankAllocator allocator;
    private bool enabled = true;

    internal AdaLoraAdapter(IAdapterMethod method, IAdaptableModel model, AdaLoraOptions options, IReadOnlyDictionary<string, int>? ranks = null)
    {
        Method = method;
        this.model = model;
        this.options = options;
        foreach (var p in model.Root.parameters()) p.requires_grad_(false);
        var paths = ResolveTargets(model, options.EffectiveTargets);
        layers = paths.Select(path =>
        {
            var layer = new SvdLinear(model.Root.get_submodule(path)!, ranks?.GetValueOrDefault(path, options.InitR) ?? options.InitR,
                options.LoraAlpha, options.LoraDropout) { RankNum = options.InitR };
            layer.train(model.Root.training);
            model.Root.replace_submodule(path, layer);
            return (path, layer);
        }).ToList();
        allocator = new RankAllocator(layers.Select(l => l.layer).ToList(), options);
    }

    public IAdapterMethod Method { get; }

    public object Options => options;

    /// <summary>Module paths and their adapter layers, in model order.</summary>
    public IReadOnlyList<(string path, SvdLinear layer)> Layers => layers;

    public RankAllocator Allocator => allocator;

    public bool Enabled
    {
        get => enabled;
        set
        {
            enabled = value;
            foreach (var (_, l) in layers)
            {
                if (!value) l.Unmerge();
                l.Enabled = value;
            }
        }
    }

    public IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay)
    {
        var matrices = layers.SelectMany(l => new[] { l.layer.A, l.layer.B }).ToList();
        var values = layers.Select(l => l.layer.E).ToList();
        return [new ParamGroup(matrices, learningRate, weightDecay, "decay"), new ParamGroup(values, learningRate, 0.0, "no_decay")];
    }

    /// <summary>orth_reg_weight · mean over A and B of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (PEFT adds it to the loss in training).</summary>
    public Tensor? AuxiliaryLoss()
    {
        if (!enabled || options.OrthRegWeight == 0 || layers.Count == 0 || !model.Root.training) return null;
        using var scope = torch.NewDisposeScope();
        Tensor? total = null;
        foreach (var (_, l) in layers)
            foreach (var cov in new[] { l.A.matmul(l.A.t()), l.B.t().matmul(l.B) })
            {
                var term = cov.sub(torch.eye(cov.size(0), dtype: cov.dtype, device: cov.device)).pow(2).sum().sqrt();
                total = total is null ? term : total + term;
            }
        return total!.mul(options.OrthRegWeight / (2.0 * layers.Count)).MoveToOuterDisposeScope();
    }

    /// <summary>Smooths the sensitivities while the budget is still moving (gradients are there now).</summary>
    public void OnAfterBackward(long step)
    {
        if (step < options.TotalStep!.Value - options.Tfinal) allocator.UpdateImportance();
    }

    /// <summary>Masks to the scheduled budget; fixes the pattern at total_step − tfinal and keeps it after.</summary>
    public void OnStepEnd(long step)
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
            allocator.MaskWithPattern(layers.Select(l => options.RankPattern[PatternKey(l.path)]).ToArray());
        }
    }

    private void Record(bool[][] pattern) =>
        options.RankPattern = layers.Select((l, i) => (PatternKey(l.path), pattern[i])).ToDictionary(p => p.Item1, p => p.Item2);

    /// <summary>Triplets in use per layer (E ≠ 0 or never masked), the effective ranks.</summary>
    public IReadOnlyDictionary<string, int> EffectiveRanks() =>
        layers.ToDictionary(l => l.path, l => options.RankPattern?.TryGetValue(PatternKey(l.path), out var keep) == true ? keep.Count(k => k) : l.layer.Rank);

    internal static string PatternKey(string path) => path + ".lora_E";

    public IReadOnlyDictionary<string, Tensor> StateDict() => AdaLoraFiles.StateDict(layers, options.RankPattern);

    public void Save(string directory) => AdaLoraFiles.Save(directory, layers, options, model.NameOrPath);

    public bool CanMerge => true;

    public void Merge()
    {
        foreach (var (_, l) in layers) l.Merge();
    }

    public void Unmerge()
    {
        foreach (var (_, l) in layers) l.Unmerge();
    }

    public long ModelParameterCount => model.Root.parameters().Sum(p => p.numel());

    /// <summary>Unloads: unmerges and puts the original Linear layers back.</summary>
    public void Dispose()
    {
        foreach (var (path, l) in layers)
        {
            l.Unmerge();
            model.Root.replace_submodule(path, l.Unwrap());
            l.Dispose();
        }
        layers.Clear();
        allocator.Dispose();
    }

    private static List<string> ResolveTargets(IAdaptableModel model, List<string> names)
    {
        var (paths, linears) = LinearTargets.Match(model.Root, names, model.OutputModuleNames);
        if (paths.Count == 0)
            throw AdaLoraOptions.Bad("target_modules", $"[{string.Join(", ", names)}] matches no Linear layer; Linear layers here: {LinearTargets.Describe(linears)}");
        return paths;
    }
}
