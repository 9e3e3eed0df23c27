using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using ParamGroup = LoRAHub.TorchExtensions.Optim.ParamGroup;

namespace LoRAHub.Tuners.Lora;

/// <summary>
/// LoRA on one model (PEFT's LoraModel): any number of named adapters (one or several active), merge/unmerge,
/// merge_and_unload, weighted combination, hot swap, deletion, mixed batches, and PEFT-format save/load. Variants (DoRA) and methods built on LoRA (QLoRA,
/// LongLoRA) use it as it is. Dispose unloads: the original Linear layers go back into the model.
/// </summary>
public sealed class LoraAdapter : BaseTuner<LoraLinear>, IAdapterSet
{
    public const string DefaultName = "default";

    private readonly Dictionary<string, AdapterPlan> plans = new();
    private readonly List<string> order = new();
    private readonly Dictionary<string, SavedModule> savedModules = new();
    // trainable_token_indices layers by module path (a tied head's layer follows the input embedding's).
    private readonly Dictionary<string, TrainableTokensLayer> tokenLayers = new();
    // True once an adapter gave the model's tied output head a module of its own (re-tied when no adapter needs it).
    private bool untiedHead;
    // Every bias of the base model with the path of the module that owns it, captured before anything is wrapped.
    private readonly List<(string owner, Parameter bias)> baseBiases;
    // Variants whose PEFT configs LoadAdapter accepts (a method plugin that builds on LoRA passes its own; AcceptVariants adds more).
    private readonly List<ILoraVariant> loadableVariants;
    // The active adapters (PEFT's active_adapters): forward sums them in this order; training trains them.
    private readonly List<string> active = new();
    private bool perRow;
    // PiSSA/OLoRA adapters: A₀ and B₀ as initialised, per layer, for PEFT's conversion to plain LoRA on save.
    private readonly Dictionary<string, Dictionary<string, (Tensor a, Tensor b)>> initialFactors = new();

    /// <summary>
    /// LoRA on <paramref name="model"/> (no adapter yet). <paramref name="variants"/> are the LoRA variants whose PEFT
    /// folders <see cref="LoadAdapter"/> accepts besides plain LoRA (e.g. DoRA's use_dora).
    /// </summary>
    public LoraAdapter(IAdapterMethod method, IAdaptableModel model, IReadOnlyList<ILoraVariant>? variants = null) : base(method, model)
    {
        if (model.Root.named_modules().Any(m => m.module is LoraLinear))
            throw new AdapterConfigurationException("the model already carries LoRA layers; add adapters through the LoraAdapter that " +
                "owns them (AddAdapter, LoadAdapter) or dispose it first");
        loadableVariants = [.. variants ?? []];
        baseBiases = model.Root.named_parameters()
            .Where(p => p.name == "bias" || p.name.EndsWith(".bias", StringComparison.Ordinal))
            .Select(p => (p.name.Length > 4 ? p.name[..^5] : "", p.parameter)).ToList();
        // Only adapter parameters train; the base stays frozen.
        FreezeBase();
    }

    /// <summary>
    /// A new adapter on <paramref name="model"/> with <paramref name="add"/> applied (AddAdapter, LoadAdapter). When
    /// <paramref name="add"/> fails, the adapter is disposed, so the model is left as it was, and the error propagates.
    /// </summary>
    public static LoraAdapter Build(IAdapterMethod method, IAdaptableModel model, Action<LoraAdapter> add, IReadOnlyList<ILoraVariant>? variants = null) =>
        Adapters.Build(new LoraAdapter(method, model, variants), add);

    /// <summary>The active adapter's options (as resolved: defaults applied).</summary>
    public override object Options => plans[ActiveAdapter].Options;

    public IReadOnlyList<string> AdapterNames => order;

    /// <summary>The active adapter, the first of <see cref="ActiveAdapters"/> when several are (what Save and StateDict use).</summary>
    public string ActiveAdapter => active.Count > 0 ? active[0]
        : throw new InvalidOperationException(order.Count == 0 ? "no adapter has been added" : "no adapter is active; call SetActiveAdapter");

    /// <summary>The adapters forward applies (summed) and training trains (PEFT's active_adapters).</summary>
    public IReadOnlyList<string> ActiveAdapters => active;

    public LoraOptions OptionsOf(string adapter) => Plan(adapter).Options;

    // ---- adapters ----

    /// <summary>Adds an adapter (inactive unless it is the first). Throws AdapterConfigurationException for bad options.</summary>
    public void AddAdapter(string name, LoraOptions options)
    {
        CheckNewName(name);
        Apply(name, AdapterPlan.Create(Model, options.Clone()));
    }

    private void Apply(string name, AdapterPlan plan)
    {
        CheckLive();
        CheckHeadUse(plan);
        foreach (var (path, r, alpha) in plan.Layers)
        {
            var layer = Inject(path, b => new LoraLinear(b));
            layer.UpdateLayer(name, r, alpha, plan.Options.LoraDropout, plan.Options.UseRslora, plan.Options.InitLoraWeights, AdapterDType(layer),
                plan.Variant, plan.Options.LoraBias);
            // LoftQ on a dense base (PEFT's LoRA with init "loftq"); a 4-bit base was made by a method that ran LoftQ first (QLoRA).
            if (plan.Options.InitLoraWeights.IsLoftQ && !layer.IsQuantized) LoraInitializers.LoftQ(layer, name, plan.Options.LoftqIter);
            if (plan.Options.InitLoraWeights.ChangesBase)
            {
                if (!initialFactors.TryGetValue(name, out var factors)) initialFactors[name] = factors = new();
                factors[path] = (layer.A(name).detach().clone().DetachFromDisposeScope(), layer.B(name).detach().clone().DetachFromDisposeScope());
            }
        }
        if (plan.UntiesHead && Model is ITiedOutputHead { OutputHeadTied: true } tied)
        {
            tied.UntieOutputHead();
            untiedHead = true;
        }
        foreach (var path in plan.SavedPaths)
        {
            if (!savedModules.TryGetValue(path, out var saved))
                savedModules[path] = saved = new SavedModule(path, Model.Root.get_submodule(path)!);
            saved.AddCopy(name);
        }
        foreach (var (path, indices) in plan.TokenLayers)
        {
            var layer = TokenLayer(path, null);
            var dtype = layer.WeightDType is ScalarType.Float32 or ScalarType.Float64 ? layer.WeightDType : ScalarType.Float32;
            layer.AddAdapter(name, indices, dtype);
        }
        if (plan.TiedTokenHead is { } head)
            TokenLayer(head, tokenLayers[((ITiedOutputHead)Model).InputEmbeddingsPath]);
        plans[name] = plan;
        order.Add(name);
        if (active.Count == 0) active.Add(name);
        ApplyState();
    }

    // A module holds either trained copies (modules_to_save) or trainable rows, not both.
    private void CheckHeadUse(AdapterPlan plan)
    {
        if (plan.TiedTokenHead is { } head && savedModules.ContainsKey(head))
            throw new AdapterConfigurationException($"'{head}' holds another adapter's modules_to_save copy; trainable tokens cannot follow the " +
                "embedding there as well. Delete that adapter first");
        foreach (var path in plan.SavedPaths.Where(tokenLayers.ContainsKey))
            throw new AdapterConfigurationException($"'{path}' has another adapter's trainable tokens; it cannot also be in modules_to_save. " +
                "Delete that adapter first");
        foreach (var (path, _) in plan.TokenLayers.Where(t => savedModules.ContainsKey(t.path)))
            throw new AdapterConfigurationException($"'{path}' is another adapter's modules_to_save; it cannot also have trainable tokens. " +
                "Delete that adapter first");
        // Untied by another adapter, the head no longer shares the table, so the rows could not reach the logits as on a tied model.
        if (untiedHead && Model is ITiedOutputHead tied && plan.TiedTokenHead is null && !tokenLayers.ContainsKey(tied.OutputHeadPath)
            && plan.TokenLayers.Any(t => t.path == tied.InputEmbeddingsPath))
            throw new AdapterConfigurationException($"the model's tied output head was given a module of its own by another adapter's modules_to_save; " +
                $"trainable tokens on '{tied.InputEmbeddingsPath}' could not reach its logits. Delete that adapter first");
    }

    // The trainable-tokens layer at the path, wrapping the module there on first use.
    private TrainableTokensLayer TokenLayer(string path, TrainableTokensLayer? tied)
    {
        if (tokenLayers.TryGetValue(path, out var existing)) return existing;
        var module = Model.Root.get_submodule(path) as nn.Module<Tensor, Tensor>
            ?? throw new AdapterConfigurationException($"'{path}' is not a Module<Tensor, Tensor>; trainable tokens cannot wrap it");
        var layer = new TrainableTokensLayer(module, tied);
        Model.Root.replace_submodule(path, layer);
        tokenLayers[path] = layer;
        return layer;
    }

    // Puts the base modules back (every layer, or those with no adapter left) and re-ties the head when nothing needs it.
    private void ReleaseTokenLayers(bool all)
    {
        foreach (var (path, layer) in tokenLayers.Where(t => t.Value.TiedTo is null).ToList())
        {
            if (!all && plans.Keys.Any(layer.Has)) continue;
            foreach (var (followerPath, follower) in tokenLayers.Where(t => t.Value.TiedTo == layer).ToList())
            {
                Model.Root.replace_submodule(followerPath, follower.base_layer);
                follower.Release();
                tokenLayers.Remove(followerPath);
            }
            Model.Root.replace_submodule(path, layer.base_layer);
            layer.Release();
            tokenLayers.Remove(path);
        }
        if (untiedHead && Model is ITiedOutputHead tied && !savedModules.ContainsKey(tied.OutputHeadPath)
            && !savedModules.ContainsKey(tied.InputEmbeddingsPath) && !tokenLayers.ContainsKey(tied.OutputHeadPath))
            untiedHead = !tied.TryRetieOutputHead();
    }

    /// <summary>fp32 adapters on half-precision bases (PEFT's autocast_adapter_dtype); otherwise the base dtype.</summary>
    private static ScalarType AdapterDType(LoraLinear layer) =>
        layer.base_linear.weight_dtype is ScalarType.Float32 or ScalarType.Float64 ? layer.base_linear.weight_dtype : ScalarType.Float32;

    /// <summary>Makes the adapter the one forward applies and the one that trains (PEFT's set_adapter; unmerges first).</summary>
    public void SetActiveAdapter(string name) => SetActiveAdapters([name]);

    /// <summary>
    /// Makes several adapters active (PEFT's set_adapter with a list): forward adds each one's update, and all of them
    /// train. At most one of them may have modules_to_save (PEFT's rule: the module can hold one trained copy at a time).
    /// </summary>
    public void SetActiveAdapters(IReadOnlyList<string> names)
    {
        CheckLive();
        if (names.Count == 0) throw new ArgumentException("name at least one adapter to activate");
        foreach (var name in names) Plan(name);
        var withSaved = names.Distinct().Where(n => plans[n].SavedPaths.Count > 0 || plans[n].TokenLayers.Count > 0).ToList();
        if (withSaved.Count > 1)
            throw new InvalidOperationException($"adapters {string.Join(", ", withSaved.Select(n => $"'{n}'"))} all have modules_to_save or " +
                "trainable_token_indices; only one of them can be active at a time (each holds its own copy of the module or rows)");
        if (IsMerged) Unmerge();
        active.Clear();
        active.AddRange(names.Distinct());
        ApplyState();
    }

    protected override void OnEnabledChanged() => ApplyState();

    // Layer flags, requires_grad and modules_to_save tensors follow the active adapter and the enabled flag.
    private void ApplyState()
    {
        foreach (var layer in Layers.Values)
        {
            layer.ActiveAdapters = active.ToList();
            foreach (var name in layer.lora_A.Keys)
            {
                var on = active.Contains(name);
                layer.A(name).requires_grad = on;
                layer.B(name).requires_grad = on;
                if (layer.BBias(name) is { } loraBias) loraBias.requires_grad = on;
                foreach (var (_, t) in layer.VariantTensors(name)) t.requires_grad = on;
            }
        }
        // Rows of a mixed batch see the original modules (adapters with modules_to_save are refused there).
        foreach (var saved in savedModules.Values) saved.Use(Enabled && !perRow ? active.FirstOrDefault(saved.Has) : null);
        foreach (var tokens in tokenLayers.Values.Where(t => t.TiedTo is null))
        {
            tokens.Active = Enabled && !perRow ? active.FirstOrDefault(tokens.Has) : null;
            foreach (var name in plans.Keys.Where(tokens.Has)) tokens.Rows(name).values.requires_grad = active.Contains(name);
        }
        foreach (var (_, bias) in baseBiases) bias.requires_grad = false;
        foreach (var (_, bias) in TrainableBiases()) bias.requires_grad = true;
    }

    /// <summary>The base biases the active adapters train (bias "all" or "lora_only"), by their current parameter names.</summary>
    private IEnumerable<(string name, Parameter bias)> TrainableBiases() =>
        active.SelectMany(a => BiasesOf(plans[a])).DistinctBy(b => b.name);

    private IEnumerable<(string name, Parameter bias)> BiasesOf(AdapterPlan plan)
    {
        if (plan.Options.Bias == "none") yield break;
        var adapted = plan.Layers.Select(l => l.path).ToHashSet();
        foreach (var (owner, bias) in baseBiases)
        {
            if (savedModules.Keys.Any(s => owner == s || owner.StartsWith(s + ".", StringComparison.Ordinal))) continue;
            var wrapped = Layers.ContainsKey(owner) || adapted.Contains(owner);
            if (plan.Options.Bias == "lora_only" && !adapted.Contains(owner)) continue;
            var module = wrapped ? owner + ".base_layer" : owner;
            yield return (module.Length == 0 ? "bias" : module + ".bias", bias);
        }
    }

    // ---- merge ----
    // BaseTuner's Merge folds the active adapter into the base weights (W += s·B·A in W's dtype; forward then skips the
    // adapter path) and Unmerge subtracts it again; MergeAndUnload leaves a plain model with the active adapter's
    // modules_to_save copies in place of the originals (PEFT's ModulesToSaveWrapper.unload_and_optionally_merge_module).

    protected override void OnUnloaded(bool merged)
    {
        foreach (var (a, b) in initialFactors.Values.SelectMany(f => f.Values))
        {
            a.Dispose();
            b.Dispose();
        }
        initialFactors.Clear();
        foreach (var saved in savedModules.Values)
        {
            if (merged && active.FirstOrDefault(saved.Has) is { } kept) saved.Commit(kept, Model.Root);
            else saved.Unload();
        }
        savedModules.Clear();
        // Trained rows are written into the base table (PEFT's unload_and_optionally_merge_module); a tied head shares it.
        if (merged)
            foreach (var tokens in tokenLayers.Values.Where(t => t.TiedTo is null))
                if (active.FirstOrDefault(tokens.Has) is { } kept)
                    tokens.Merge(kept);
        ReleaseTokenLayers(all: true);
    }

    /// <summary>Folds the active adapters into the base weights, trainable token rows included.</summary>
    public override void Merge()
    {
        base.Merge();
        MergeTokens(active, safeMerge: false);
    }

    /// <summary>Subtracts what <see cref="Merge()"/> added and puts the original token rows back.</summary>
    public override void Unmerge()
    {
        base.Unmerge();
        foreach (var tokens in tokenLayers.Values) tokens.Unmerge();
    }

    private void MergeTokens(IReadOnlyList<string> names, bool safeMerge)
    {
        foreach (var tokens in tokenLayers.Values.Where(t => t.TiedTo is null))
            if (names.FirstOrDefault(tokens.Has) is { } name)
                tokens.Merge(name, safeMerge);
    }

    /// <summary>
    /// Removes an adapter and frees its tensors and modules_to_save copies (PEFT's delete_adapter). When it was active,
    /// the first remaining adapter becomes active (as PEFT does); deleting the last one leaves the base model's output.
    /// </summary>
    public void DeleteAdapter(string name)
    {
        CheckLive();
        Plan(name);
        if (perRow) throw new InvalidOperationException($"adapter '{name}' cannot be deleted inside a UseAdapterPerRow scope");
        foreach (var layer in Layers.Values) layer.DeleteAdapter(name);
        foreach (var (path, saved) in savedModules.ToList())
        {
            saved.RemoveCopy(name);
            if (saved.IsEmpty)
            {
                saved.Unload();
                savedModules.Remove(path);
            }
        }
        foreach (var tokens in tokenLayers.Values.Where(t => t.TiedTo is null).ToList()) tokens.RemoveAdapter(name);
        if (initialFactors.Remove(name, out var initial))
            foreach (var (a, b) in initial.Values)
            {
                a.Dispose();
                b.Dispose();
            }
        plans.Remove(name);
        order.Remove(name);
        ReleaseTokenLayers(all: false);
        if (active.Remove(name) && active.Count == 0 && order.Count > 0) active.Add(order[0]);
        ApplyState();
    }

    /// <summary>
    /// Mixed-batch inference (PEFT's forward/generate with adapter_names): inside the scope, row i of every batch uses
    /// adapter <paramref name="rowAdapters"/>[i], or none for "__base__". Refused with merged adapters (their update is
    /// in every row, as PEFT refuses) and for adapters with modules_to_save (a module holds one adapter's copy at a time).
    /// </summary>
    public IDisposable UseAdapterPerRow(IReadOnlyList<string> rowAdapters)
    {
        CheckLive();
        if (perRow) throw new InvalidOperationException("a UseAdapterPerRow scope is open already; dispose it first");
        if (rowAdapters.Count == 0) throw new ArgumentException("give one adapter name per batch row");
        foreach (var name in rowAdapters.Distinct())
        {
            if (name == IAdapterSet.BaseName) continue;
            if (!plans.TryGetValue(name, out var plan))
                throw new KeyNotFoundException($"row adapter '{name}' is not loaded; adapters: {string.Join(", ", order)} (or \"{IAdapterSet.BaseName}\" for the base model)");
            if (plan.SavedPaths.Count > 0 || plan.TokenLayers.Count > 0)
                throw new NotSupportedException($"adapter '{name}' has modules_to_save or trainable_token_indices " +
                    $"({string.Join(", ", plan.SavedPaths.Concat(plan.TokenLayers.Select(t => t.path)))}), which one batch cannot apply " +
                    "per row here; run its rows in a separate batch");
        }
        if (IsMerged)
            throw new InvalidOperationException("adapters are merged into the base weights, so every row would carry them; Unmerge() before a mixed batch");
        perRow = true;
        var rows = new RowRouting(rowAdapters.ToArray());
        foreach (var layer in Layers.Values) layer.RowAdapters = rows;
        ApplyState();
        return new Scope(() =>
        {
            perRow = false;
            foreach (var layer in Layers.Values) layer.RowAdapters = null;
            rows.Dispose();
            if (!IsUnloaded) ApplyState();
        });
    }

    private sealed class Scope(Action end) : IDisposable
    {
        private Action? end = end;

        public void Dispose()
        {
            end?.Invoke();
            end = null;
        }
    }

    // ---- merge of chosen adapters ----

    /// <summary>
    /// PEFT's merge_adapter(adapter_names, safe_merge): folds the named adapters (null: the active ones) into the base
    /// weights. With <paramref name="safeMerge"/>, each merged weight is checked for NaN/inf first and a broken
    /// adapter leaves the weight as it was, with an error naming it.
    /// </summary>
    public void Merge(IReadOnlyList<string>? adapterNames, bool safeMerge = false)
    {
        CheckLive();
        var names = adapterNames ?? active;
        foreach (var name in names) Plan(name);
        if (Layers.FirstOrDefault(l => l.Value.IsQuantized) is { Value: not null } quantized)
            throw new InvalidOperationException($"'{quantized.Key}' has a 4-bit base: an in-place merge would quantize the merged weight " +
                "again (lossy, not reversible). Use MergeAndUnload(), which gives a dense model with the merged weights");
        foreach (var name in names.ToList())
            foreach (var layer in Layers.Values.Where(l => l.HasAdapter(name)))
                layer.Merge(name, safeMerge);
        MergeTokens(names, safeMerge);
    }

    /// <summary>
    /// PEFT's merge_and_unload(adapter_names, safe_merge): merges the named adapters (null: the active ones), puts the
    /// base layers back and returns the plain model.
    /// </summary>
    public IAdaptableModel MergeAndUnload(IReadOnlyList<string>? adapterNames, bool safeMerge = false)
    {
        CheckLive();
        if (adapterNames is not null) SetActiveAdapters(adapterNames);
        if (safeMerge && !Layers.Values.Any(l => l.IsQuantized)) Merge(null, safeMerge: true);
        return MergeAndUnload();
    }

    // ---- weighted combination ----

    /// <summary>
    /// PEFT's add_weighted_adapter: a new adapter <paramref name="newName"/> combining <paramref name="adapters"/> with
    /// one weight each (negative weights subtract). <paramref name="combinationType"/>: "cat" (the default here: exact,
    /// Σ wᵢ·ΔWᵢ at rank Σ rᵢ), "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune" (A and B combined
    /// separately; equal ranks), or "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd" (the
    /// deltas combined, then truncated by SVD to <paramref name="svdRank"/>, default the largest rank).
    /// <paramref name="density"/> is the fraction kept by the pruning types; <paramref name="majoritySignMethod"/>
    /// "total" or "frequency" elects TIES' signs. One adapter always combines as "linear" (as PEFT). The new adapter has
    /// r = lora_alpha (scale 1) and no use_rslora, so its saved config reproduces it. LoRA matrices only: DoRA,
    /// lora_bias and modules_to_save adapters are refused. The math is in <see cref="Merging.WeightedAdapter"/>.
    /// </summary>
    public void AddWeightedAdapter(string newName, IReadOnlyList<string> adapters, IReadOnlyList<double> weights,
        string combinationType = "cat", int? svdRank = null, double? svdClamp = null, bool svdFullMatrices = true, double? density = null,
        string majoritySignMethod = "total")
    {
        CheckNewName(newName);
        if (adapters.Count == 0 || adapters.Count != weights.Count)
            throw new ArgumentException($"give one weight per adapter ({adapters.Count} adapters, {weights.Count} weights)");
        if (!Merging.WeightedAdapter.CombinationTypes.Contains(combinationType))
            throw new ArgumentException($"invalid combination_type \"{combinationType}\"; use one of {string.Join(", ", Merging.WeightedAdapter.CombinationTypes)}");
        if (majoritySignMethod is not ("total" or "frequency"))
            throw new ArgumentException($"majority_sign_method must be \"total\" or \"frequency\", got \"{majoritySignMethod}\"");
        var type = adapters.Count == 1 ? "linear" : combinationType;
        var pruning = type is not ("cat" or "linear" or "svd");
        if (pruning && density is not (>= 0 and <= 1))
            throw new ArgumentException($"combination_type \"{type}\" needs density in [0, 1] (the fraction of entries kept), got {density?.ToString() ?? "none"}");
        if (svdClamp is { } clamp && clamp is not (>= 0 and <= 1))
            throw new ArgumentException($"svd_clamp is a quantile in [0, 1], got {clamp}");
        var sources = adapters.Select(Plan).ToList();
        if (sources.FirstOrDefault(p => p.Variant != null) is { } variant)
            throw new InvalidOperationException($"adapter '{adapters[sources.IndexOf(variant)]}' is a {variant.Variant!.ConfigFlag} adapter, whose " +
                "update is not linear in B·A: a weighted combination cannot represent it exactly");
        if (sources.FirstOrDefault(p => p.Options.LoraBias) is { } withBias)
            throw new InvalidOperationException($"adapter '{adapters[sources.IndexOf(withBias)]}' has lora_bias, which a weighted combination " +
                "cannot represent");
        if (sources.FirstOrDefault(p => p.SavedPaths.Count > 0 || p.TokenLayers.Count > 0) is { } withSaved)
            throw new InvalidOperationException($"adapter '{adapters[sources.IndexOf(withSaved)]}' has modules_to_save or trainable_token_indices, " +
                "which a weighted combination cannot represent exactly");
        // PEFT sizes ranks from each config's largest rank (r or a rank_pattern value).
        var ranks = sources.Select(p => p.Layers.Max(l => l.r)).ToList();
        int rank;
        if (type == "cat") rank = ranks.Sum();
        else if (type.EndsWith("svd", StringComparison.Ordinal)) rank = svdRank ?? ranks.Max();
        else if (ranks.Distinct().Count() == 1) rank = ranks[0];
        else
            throw new InvalidOperationException($"combination_type \"{type}\" needs every adapter to have the same r (got {string.Join(", ", ranks)}); " +
                "use \"cat\" or an \"_svd\" type");
        if (rank <= 0) throw new ArgumentException($"svd_rank must be positive, got {rank}");
        var paths = sources.SelectMany(p => p.Layers.Select(l => l.path)).Distinct().Order(StringComparer.Ordinal).ToList();
        var options = sources[0].Options.Clone();
        options.R = rank;
        options.LoraAlpha = rank;
        options.UseRslora = false; // scale exactly 1 (PEFT keeps use_rslora, which would scale the result by √rank)
        options.RankPattern = new();
        options.AlphaPattern = new();
        options.ModulesToSave = null;
        options.TrainableTokenIndices = null;
        options.TargetModules = TargetModuleSpec.FromNames(paths);
        options.InitLoraWeights = LoraInit.Default;
        // Every factor is computed before the adapter exists, so a failing combination leaves the model as it was.
        var factors = new Dictionary<string, (Tensor a, Tensor b)>();
        try
        {
            using (no_grad())
            {
                foreach (var path in paths)
                {
                    var layer = Layers[path];
                    var present = adapters.Select((name, i) => (name, weight: weights[i])).Where(s => layer.HasAdapter(s.name)).ToList();
                    factors[path] = type switch
                    {
                        "cat" => Merging.WeightedAdapter.Cat(layer, present, rank),
                        _ when Merging.WeightedAdapter.IsFactorwise(type) => Merging.WeightedAdapter.Factorwise(layer, present, type, density ?? 1, majoritySignMethod),
                        _ => Merging.WeightedAdapter.Svd(layer, present, type, rank, density ?? 1, majoritySignMethod, svdClamp, svdFullMatrices),
                    };
                }
            }
            Apply(newName, new AdapterPlan
            {
                Options = options,
                Targets = options.TargetModules,
                Layers = paths.Select(p => (p, rank, (double)rank)).ToList(),
                SavedPaths = [],
            });
            using var _ = no_grad();
            foreach (var (path, (a, b)) in factors)
            {
                Layers[path].A(newName).copy_(a);
                Layers[path].B(newName).copy_(b);
                Layers[path].MarkAdapterWeightsChanged();
            }
        }
        finally
        {
            foreach (var (a, b) in factors.Values)
            {
                a.Dispose();
                b.Dispose();
            }
        }
    }

    // ---- state, save, load ----

    /// <summary>The active adapter's tensors under PEFT's saved key names (live tensors: do not dispose).</summary>
    public override IReadOnlyDictionary<string, Tensor> StateDict() => StateDictOf(ActiveAdapter);

    public Dictionary<string, Tensor> StateDictOf(string adapter)
    {
        CheckLive();
        var plan = Plan(adapter);
        var result = new Dictionary<string, Tensor>();
        foreach (var (path, _, _) in plan.Layers)
        {
            result[PeftKeys.LoraA(path)] = Layers[path].A(adapter);
            result[PeftKeys.LoraB(path)] = Layers[path].B(adapter);
            if (Layers[path].BBias(adapter) is { } loraBias) result[PeftKeys.Parameter(path + ".lora_B.bias")] = loraBias;
            foreach (var (key, tensor) in Layers[path].VariantTensors(adapter)) result[PeftKeys.Parameter(path + "." + key)] = tensor;
        }
        foreach (var path in plan.SavedPaths)
            foreach (var (key, tensor) in savedModules[path].Copies(adapter))
                result[PeftKeys.Parameter(path + "." + key)] = tensor;
        // A tied head's rows are the embedding's: saved once, under the embedding (as PEFT).
        foreach (var (path, _) in plan.TokenLayers) result[PeftKeys.TrainableTokens(path)] = tokenLayers[path].Rows(adapter).values;
        foreach (var (name, bias) in BiasesOf(plan)) result[PeftKeys.Parameter(name)] = bias;
        return result;
    }

    /// <summary>Saves the active adapter in PEFT's format (adapter_config.json + adapter_model.safetensors).</summary>
    public override void Save(string directory) => SaveAdapter(directory, ActiveAdapter);

    public void SaveAdapter(string directory, string adapter) => SaveAdapter(directory, adapter, convertToLora: false);

    /// <summary>
    /// Saves <paramref name="adapter"/>; with <paramref name="convertToLora"/>, a PiSSA or OLoRA adapter is saved as the
    /// plain LoRA adapter that gives the same model on the ORIGINAL base (PEFT's save_pretrained with
    /// path_initial_model_for_weight_conversion): ΔW = s·(B·A − B₀·A₀) = s·[B, −B₀]·[A; A₀], so r and lora_alpha double
    /// (alpha by √2 with use_rslora, keeping the scale), rank/alpha patterns likewise, and init_lora_weights becomes true.
    /// </summary>
    public void SaveAdapter(string directory, string adapter, bool convertToLora)
    {
        var plan = Plan(adapter);
        var options = plan.Options;
        var tensors = StateDictOf(adapter);
        var owned = new List<Tensor>();
        if (convertToLora)
        {
            if (!initialFactors.TryGetValue(adapter, out var initial))
                throw new InvalidOperationException($"adapter '{adapter}' has init_lora_weights {options.InitLoraWeights}: only PiSSA and OLoRA adapters " +
                    "(which rewrite the base) need converting; save it as it is");
            if (plan.Variant is not null)
                throw new InvalidOperationException($"adapter '{adapter}' is a {plan.Variant.ConfigFlag} adapter, whose update is not linear in B·A: " +
                    "it cannot be converted to plain LoRA");
            using (no_grad())
                foreach (var (path, (a0, b0)) in initial)
                {
                    var a = cat([Layers[path].A(adapter), a0], 0);
                    var b = cat([Layers[path].B(adapter), b0.neg()], 1);
                    owned.Add(a);
                    owned.Add(b);
                    tensors[PeftKeys.LoraA(path)] = a;
                    tensors[PeftKeys.LoraB(path)] = b;
                }
            options = options.Clone();
            var alphaFactor = options.UseRslora ? Math.Sqrt(2) : 2;
            options.R *= 2;
            options.LoraAlpha *= alphaFactor;
            options.RankPattern = options.RankPattern.ToDictionary(kv => kv.Key, kv => kv.Value * 2);
            options.AlphaPattern = options.AlphaPattern.ToDictionary(kv => kv.Key, kv => kv.Value * alphaFactor);
            options.InitLoraWeights = LoraInit.Default;
        }
        try
        {
            Directory.CreateDirectory(directory);
            AdapterWeightsFile.Write(Path.Combine(directory, AdapterWeightsFile.FileName), tensors);
            LoraConfigFile.Write(Path.Combine(directory, LoraConfigFile.FileName), options, plan.Targets, Model.NameOrPath);
        }
        finally
        {
            foreach (var t in owned) t.Dispose();
        }
    }

    /// <summary>
    /// Lets <see cref="LoadAdapter"/> read folders of these variants too (those of another <see cref="ILoraMethod"/>, e.g.
    /// DoRA's into a set the "lora" method made); a variant whose config key is accepted already is skipped.
    /// </summary>
    public void AcceptVariants(IEnumerable<ILoraVariant> variants)
    {
        foreach (var variant in variants)
            if (!loadableVariants.Any(v => v.ConfigFlag == variant.ConfigFlag)) loadableVariants.Add(variant);
    }

    /// <summary>
    /// Loads a PEFT LoRA adapter folder as <paramref name="name"/>. A new name is added (inactive unless first); an
    /// existing name is hot-swapped: its tensors are overwritten in place (same targets and ranks required), the base
    /// model untouched. Every key must map to this adapter's modules with matching shapes, else nothing changes.
    /// </summary>
    public void LoadAdapter(string directory, string name)
    {
        CheckLive();
        var options = LoraConfigFile.Read(Path.Combine(directory, LoraConfigFile.FileName), loadableVariants);
        var weightsPath = Path.Combine(directory, AdapterWeightsFile.FileName);
        var device = Model.Root.parameters().FirstOrDefault()?.device ?? CPU;
        var loaded = AdapterWeightsFile.Read(weightsPath, device);
        try
        {
            if (plans.ContainsKey(name))
            {
                var (had, has) = (plans[name].Variant?.ConfigFlag, options.ResolveLoraVariant()?.ConfigFlag);
                if (had != has)
                    throw new AdapterConfigurationException($"{directory}: cannot hot-swap adapter '{name}' ({had ?? "plain LoRA"}) with a " +
                        $"{has ?? "plain LoRA"} adapter; load it under another name");
                var current = StateDictOf(name);
                CheckKeys(weightsPath, loaded, current.ToDictionary(kv => kv.Key, kv => kv.Value.shape), name);
                Copy(loaded, current);
                // The swapped-in config may carry another alpha.
                var plan = plans[name];
                foreach (var (path, _, _) in plan.Layers) Layers[path].MarkAdapterWeightsChanged();
                foreach (var (path, _, _) in plan.Layers) Layers[path].SetScaling(name, options.AlphaFor(path), options.UseRslora);
                plan.Options.LoraAlpha = options.LoraAlpha;
                plan.Options.AlphaPattern = options.AlphaPattern;
                plan.Options.UseRslora = options.UseRslora;
                return;
            }
            CheckNewName(name);
            var newPlan = AdapterPlan.Create(Model, options);
            var biases = BiasesOf(newPlan).Select(b => (b.name, b.bias.shape));
            CheckKeys(weightsPath, loaded, newPlan.ExpectedShapes(Model.Root, biases), name);
            Apply(name, newPlan);
            Copy(loaded, StateDictOf(name));
            foreach (var (path, _, _) in newPlan.Layers) Layers[path].MarkAdapterWeightsChanged();
        }
        finally
        {
            foreach (var t in loaded.Values) t.Dispose();
        }
    }

    private static void CheckKeys(string file, Dictionary<string, Tensor> loaded, Dictionary<string, long[]> expected, string adapter)
    {
        foreach (var (key, tensor) in loaded)
        {
            if (!expected.TryGetValue(key, out var shape))
                throw new InvalidDataException($"{file}: key '{key}' does not map to a module adapted by '{adapter}' " +
                    $"(expected keys such as {string.Join(", ", expected.Keys.Take(3))})");
            if (!tensor.shape.SequenceEqual(shape)) throw new InvalidDataException($"{file}: {ShapeMismatch(key, tensor.shape, shape)}");
        }
        var missing = expected.Keys.Where(k => !loaded.ContainsKey(k)).ToList();
        if (missing.Count > 0)
            throw new InvalidDataException($"{file}: {missing.Count} key(s) of adapter '{adapter}' are missing, e.g. {string.Join(", ", missing.Take(3))}");
    }

    /// <summary>
    /// Which side is wrong: the expected shape comes from the base model and adapter_config.json together, so a rank
    /// that differs points at the config (r, rank_pattern), a module size that differs at another base model.
    /// </summary>
    private static string ShapeMismatch(string key, long[] inFile, long[] expected)
    {
        var text = $"key '{key}' has shape [{string.Join(", ", inFile)}] in the file, but [{string.Join(", ", expected)}] here";
        // A: [r, in] (lora_A, lora_embedding_A); B: [out, r] (lora_B, lora_embedding_B).
        int? rankAxis = key.Contains("_A.") || key.Contains("lora_embedding_A") ? 0 : key.Contains("_B.") || key.Contains("lora_embedding_B") ? 1 : null;
        if (rankAxis is not int axis || inFile.Length != 2 || expected.Length != 2) return text;
        var other = 1 - axis;
        if (inFile[other] == expected[other])
            return $"{text}: the weights have rank {inFile[axis]} where adapter_config.json gives this module r = {expected[axis]} " +
                "(r, or rank_pattern): the config was edited or belongs to other weights";
        return $"{text}: the module has {expected[other]} features in this base model and {inFile[other]} in the one the adapter " +
            "was trained on (adapter_config.json's base_model_name_or_path names it)";
    }

    private static void Copy(Dictionary<string, Tensor> source, IReadOnlyDictionary<string, Tensor> targets)
    {
        using var _ = no_grad();
        foreach (var (key, target) in targets) target.copy_(source[key]);
    }

    // ---- training ----

    /// <summary>
    /// Opens a training step on every layer (<see cref="LoraLinear.StepToken"/>): until <see cref="OnStepEnd"/>, layers may
    /// cache values derived from the weights (DoRA's norm: the checkpoint recompute and later micro-batches reuse it).
    /// </summary>
    public override void OnStepBegin(long step)
    {
        var token = LoraLinear.NewStepToken();
        foreach (var layer in Layers.Values) layer.BeginStep(token);
    }

    /// <summary>Closes the step after the optimizer step: nothing derived from the old weights is used again.</summary>
    public override void OnStepEnd(long step)
    {
        foreach (var layer in Layers.Values) layer.EndStep();
    }

    /// <summary>
    /// The active adapter's trainable tensors. Without LoRA+: weight decay on matrices, none on vectors. With LoRA+:
    /// PEFT's create_loraplus_optimizer groups (groupA at lr, embedding at loraplus_lr_embedding, groupB and
    /// groupB_no_decay at lr × loraplus_lr_ratio); weightDecay plays loraplus_weight_decay.
    /// </summary>
    public override IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay)
    {
        CheckLive();
        var o = plans[ActiveAdapter].Options;
        var (a, b, vectors, embeddings) = TrainableTensors();
        var groups = o.LoraplusLrRatio is { } ratio
            ? new List<ParamGroup>
            {
                new(a, learningRate, weightDecay, "groupA"),
                new(embeddings, o.LoraplusLrEmbedding, weightDecay, "embedding"),
                new(b, learningRate * ratio, weightDecay, "groupB"),
                new(vectors, learningRate * ratio, 0.0, "groupB_no_decay"),
            }
            : new List<ParamGroup>
            {
                new(a.Concat(b).Concat(embeddings), learningRate, weightDecay, "decay"),
                new(vectors, learningRate, 0.0, "no_decay"),
            };
        return groups.Where(g => g.Parameters.Count > 0).ToList();
    }

    // (matrices other than B and embeddings, lora_B weights, 1-D tensors, embedding tables) of the active adapter.
    private (List<Tensor> a, List<Tensor> b, List<Tensor> vectors, List<Tensor> embeddings) TrainableTensors()
    {
        List<Tensor> a = [], b = [], vectors = [], embeddings = [];
        foreach (var name in active) AddTrainable(name, a, b, vectors, embeddings);
        vectors.AddRange(TrainableBiases().Select(x => x.bias));
        return (a, b, vectors, embeddings);
    }

    private void AddTrainable(string name, List<Tensor> a, List<Tensor> b, List<Tensor> vectors, List<Tensor> embeddings)
    {
        foreach (var layer in Layers.Values.Where(l => l.HasAdapter(name)))
        {
            a.Add(layer.A(name));
            b.Add(layer.B(name));
            if (layer.BBias(name) is { } loraBias) vectors.Add(loraBias);
            foreach (var (_, t) in layer.VariantTensors(name)) (t.dim() == 1 ? vectors : a).Add(t);
        }
        foreach (var saved in savedModules.Values.Where(s => s.Has(name)))
            foreach (var (key, t) in saved.Copies(name))
            {
                var owner = key.Contains('.') ? saved.Module.get_submodule(key[..key.LastIndexOf('.')]) : saved.Module;
                (owner is Embedding ? embeddings : t.dim() == 1 ? vectors : a).Add(t);
            }
        foreach (var tokens in tokenLayers.Values.Where(t => t.TiedTo is null && t.Has(name)))
            embeddings.Add(tokens.Rows(name).values);
    }

    public long TrainableParameterCount
    {
        get
        {
            var (a, b, v, e) = TrainableTensors();
            return a.Concat(b).Concat(v).Concat(e).Sum(t => t.numel());
        }
    }

    /// <summary>Base plus every adapter's tensors (PEFT counts the originals of modules_to_save and their copies).</summary>
    public override long ModelParameterCount =>
        Model.Root.parameters().Concat(savedModules.Values.SelectMany(s => s.AllTensors)).Concat(tokenLayers.Values.SelectMany(t => t.OwnedTensors))
            .Distinct(ReferenceEqualityComparer.Instance).Cast<Parameter>().Sum(t => t.numel());

    /// <summary>PEFT's print_trainable_parameters line for the active adapter.</summary>
    public override string TrainableParametersReport() => TrainableReport.Format(TrainableParameterCount, ModelParameterCount);

    // ---- helpers ----

    private AdapterPlan Plan(string name) =>
        plans.TryGetValue(name, out var p) ? p
            : throw new KeyNotFoundException($"no adapter named '{name}'; adapters: {string.Join(", ", order)}");

    private void CheckNewName(string name)
    {
        if (string.IsNullOrEmpty(name) || name.Contains('.'))
            throw new ArgumentException($"invalid adapter name '{name}': names must be non-empty and contain no '.'");
        if (plans.ContainsKey(name)) throw new ArgumentException($"an adapter named '{name}' exists already");
    }

}
