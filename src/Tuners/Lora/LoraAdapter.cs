using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using ParamGroup = LoRAHub.TorchExtensions.Optim.ParamGroup;

namespace LoRAHub.Tuners.Lora;

/// <summary>
/// LoRA on one model (PEFT's LoraModel): any number of named adapters (one active), merge/unmerge, merge_and_unload,
/// weighted combination, hot swap, and PEFT-format save/load. Variants (DoRA) and methods built on LoRA (QLoRA,
/// LongLoRA) use it as it is. Dispose unloads: the original Linear layers go back into the model.
/// </summary>
public sealed class LoraAdapter : BaseTuner<LoraLinear>
{
    public const string DefaultName = "default";

    private readonly Dictionary<string, AdapterPlan> plans = new();
    private readonly List<string> order = new();
    private readonly Dictionary<string, SavedModule> savedModules = new();
    // Every bias of the base model with the path of the module that owns it, captured before anything is wrapped.
    private readonly List<(string owner, Parameter bias)> baseBiases;
    // Variants whose PEFT configs LoadAdapter accepts (a method plugin that builds on LoRA passes its own).
    private readonly IReadOnlyList<ILoraVariant> loadableVariants;
    private string? active;

    /// <summary>
    /// LoRA on <paramref name="model"/> (no adapter yet). <paramref name="variants"/> are the LoRA variants whose PEFT
    /// folders <see cref="LoadAdapter"/> accepts besides plain LoRA (e.g. DoRA's use_dora).
    /// </summary>
    public LoraAdapter(IAdapterMethod method, IAdaptableModel model, IReadOnlyList<ILoraVariant>? variants = null) : base(method, model)
    {
        if (model.Root.named_modules().Any(m => m.module is LoraLinear))
            throw new AdapterConfigurationException("the model already carries LoRA layers; add adapters through the LoraAdapter that " +
                "owns them (AddAdapter, LoadAdapter) or dispose it first");
        loadableVariants = variants ?? [];
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

    public string ActiveAdapter => active ?? throw new InvalidOperationException("no adapter has been added");

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
        foreach (var (path, r, alpha) in plan.Layers)
        {
            var layer = Inject(path, b => new LoraLinear(b));
            layer.UpdateLayer(name, r, alpha, plan.Options.LoraDropout, plan.Options.UseRslora, plan.Options.InitLoraWeights, AdapterDType(layer),
                plan.Variant);
        }
        foreach (var path in plan.SavedPaths)
        {
            if (!savedModules.TryGetValue(path, out var saved))
                savedModules[path] = saved = new SavedModule(path, Model.Root.get_submodule(path)!);
            saved.AddCopy(name);
        }
        plans[name] = plan;
        order.Add(name);
        active ??= name;
        ApplyState();
    }

    /// <summary>fp32 adapters on half-precision bases (PEFT's autocast_adapter_dtype); otherwise the base dtype.</summary>
    private static ScalarType AdapterDType(LoraLinear layer) =>
        layer.base_linear.weight_dtype is ScalarType.Float32 or ScalarType.Float64 ? layer.base_linear.weight_dtype : ScalarType.Float32;

    /// <summary>Makes the adapter the one forward applies and the one that trains (PEFT's set_adapter; unmerges first).</summary>
    public void SetActiveAdapter(string name)
    {
        CheckLive();
        Plan(name);
        if (IsMerged) Unmerge();
        active = name;
        ApplyState();
    }

    protected override void OnEnabledChanged() => ApplyState();

    // Layer flags, requires_grad and modules_to_save tensors follow the active adapter and the enabled flag.
    private void ApplyState()
    {
        foreach (var layer in Layers.Values)
        {
            layer.ActiveAdapter = active;
            foreach (var name in layer.lora_A.Keys)
            {
                layer.A(name).requires_grad = name == active;
                layer.B(name).requires_grad = name == active;
                foreach (var (_, t) in layer.VariantTensors(name)) t.requires_grad = name == active;
            }
        }
        foreach (var saved in savedModules.Values) saved.Use(Enabled ? active : null);
        foreach (var (_, bias) in baseBiases) bias.requires_grad = false;
        foreach (var (_, bias) in TrainableBiases()) bias.requires_grad = true;
    }

    /// <summary>The base biases the active adapter trains (bias "all" or "lora_only"), by their current parameter names.</summary>
    private IEnumerable<(string name, Parameter bias)> TrainableBiases() => active == null ? [] : BiasesOf(plans[active]);

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
        foreach (var saved in savedModules.Values)
        {
            if (merged && active is not null) saved.Commit(active, Model.Root);
            else saved.Unload();
        }
        savedModules.Clear();
    }

    // ---- weighted combination ----

    /// <summary>
    /// A new adapter equal to Σ wᵢ·ΔWᵢ, built as PEFT's "cat" combination: A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁ B₂ ...],
    /// rank = Σ rᵢ, scale 1 — so it is exact. LoRA matrices only: adapters with modules_to_save are refused.
    /// </summary>
    public void AddWeightedAdapter(string newName, IReadOnlyList<string> adapters, IReadOnlyList<double> weights)
    {
        CheckNewName(newName);
        if (adapters.Count == 0 || adapters.Count != weights.Count)
            throw new ArgumentException($"give one weight per adapter ({adapters.Count} adapters, {weights.Count} weights)");
        var sources = adapters.Select(Plan).ToList();
        if (sources.FirstOrDefault(p => p.Variant != null) is { } variant)
            throw new InvalidOperationException($"adapter '{adapters[sources.IndexOf(variant)]}' is a {variant.Variant!.ConfigFlag} adapter, whose " +
                "update is not linear in B·A: a weighted combination cannot represent it exactly");
        if (sources.FirstOrDefault(p => p.SavedPaths.Count > 0) is { } withSaved)
            throw new InvalidOperationException($"adapter '{adapters[sources.IndexOf(withSaved)]}' has modules_to_save, which a weighted " +
                "combination cannot represent exactly");
        // PEFT sizes the new rank from each config's largest rank; smaller layers leave zero rows.
        var rank = sources.Sum(p => p.Layers.Max(l => l.r));
        var paths = sources.SelectMany(p => p.Layers.Select(l => l.path)).Distinct().Order(StringComparer.Ordinal).ToList();
        var first = sources[0].Options;
        var options = first.Clone();
        options.R = rank;
        options.LoraAlpha = rank;
        options.UseRslora = false; // scale exactly 1 (PEFT keeps use_rslora, which would scale the sum by √rank)
        options.RankPattern = new();
        options.AlphaPattern = new();
        options.ModulesToSave = null;
        options.TargetModules = TargetModuleSpec.FromNames(paths);
        options.InitLoraWeights = LoraInit.Default;
        var plan = new AdapterPlan
        {
            Options = options,
            Targets = options.TargetModules,
            Layers = paths.Select(p => (p, rank, (double)rank)).ToList(),
            SavedPaths = [],
        };
        Apply(newName, plan);

        using var _ = no_grad();
        foreach (var path in paths)
        {
            using var scope = NewDisposeScope();
            var layer = Layers[path];
            var a = layer.A(newName);
            var b = layer.B(newName);
            a.zero_();
            b.zero_();
            long offset = 0;
            for (var i = 0; i < adapters.Count; i++)
            {
                if (!layer.HasAdapter(adapters[i])) continue;
                var r = layer.Rank(adapters[i]);
                a.narrow(0, offset, r).copy_(layer.A(adapters[i]).mul(weights[i] * layer.Scaling(adapters[i])));
                b.narrow(1, offset, r).copy_(layer.B(adapters[i]));
                offset += r;
            }
            layer.MarkAdapterWeightsChanged();
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
            foreach (var (key, tensor) in Layers[path].VariantTensors(adapter)) result[PeftKeys.Parameter(path + "." + key)] = tensor;
        }
        foreach (var path in plan.SavedPaths)
            foreach (var (key, tensor) in savedModules[path].Copies(adapter))
                result[PeftKeys.Parameter(path + "." + key)] = tensor;
        foreach (var (name, bias) in BiasesOf(plan)) result[PeftKeys.Parameter(name)] = bias;
        return result;
    }

    /// <summary>Saves the active adapter in PEFT's format (adapter_config.json + adapter_model.safetensors).</summary>
    public override void Save(string directory) => SaveAdapter(directory, ActiveAdapter);

    public void SaveAdapter(string directory, string adapter)
    {
        var plan = Plan(adapter);
        Directory.CreateDirectory(directory);
        AdapterWeightsFile.Write(Path.Combine(directory, AdapterWeightsFile.FileName), StateDictOf(adapter));
        LoraConfigFile.Write(Path.Combine(directory, LoraConfigFile.FileName), plan.Options, plan.Targets, Model.NameOrPath);
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
            if (!tensor.shape.SequenceEqual(shape))
                throw new InvalidDataException($"{file}: key '{key}' has shape [{string.Join(", ", tensor.shape)}] in the file but the model expects [{string.Join(", ", shape)}]");
        }
        var missing = expected.Keys.Where(k => !loaded.ContainsKey(k)).ToList();
        if (missing.Count > 0)
            throw new InvalidDataException($"{file}: {missing.Count} key(s) of adapter '{adapter}' are missing, e.g. {string.Join(", ", missing.Take(3))}");
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
        var name = ActiveAdapter;
        List<Tensor> a = [], b = [], vectors = [], embeddings = [];
        foreach (var layer in Layers.Values.Where(l => l.HasAdapter(name)))
        {
            a.Add(layer.A(name));
            b.Add(layer.B(name));
            foreach (var (_, t) in layer.VariantTensors(name)) (t.dim() == 1 ? vectors : a).Add(t);
        }
        foreach (var saved in savedModules.Values.Where(s => s.Has(name)))
            foreach (var (key, t) in saved.Copies(name))
            {
                var owner = key.Contains('.') ? saved.Module.get_submodule(key[..key.LastIndexOf('.')]) : saved.Module;
                (owner is Embedding ? embeddings : t.dim() == 1 ? vectors : a).Add(t);
            }
        vectors.AddRange(TrainableBiases().Select(x => x.bias));
        return (a, b, vectors, embeddings);
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
        Model.Root.parameters().Concat(savedModules.Values.SelectMany(s => s.AllTensors))
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
