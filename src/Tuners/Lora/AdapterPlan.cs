using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using TorchSharp;

namespace LoRAHub.Tuners.Lora;

/// <summary>
/// Where one adapter goes and what its saved state looks like, computed from its options before the model is
/// touched, so a bad option or a mismatched file fails without leaving a half-added adapter.
/// </summary>
public sealed class AdapterPlan
{
    public required LoraOptions Options { get; init; }
    public required TargetModuleSpec Targets { get; init; }

    /// <summary>Adapted module paths with their rank and alpha.</summary>
    public required List<(string path, int r, double alpha)> Layers { get; init; }

    /// <summary>modules_to_save paths.</summary>
    public required List<string> SavedPaths { get; init; }

    /// <summary>
    /// True when the adapter needs the model's tied output head as a module of its own (<see cref="ITiedOutputHead"/>):
    /// modules_to_save names lm_head, or trainable tokens on the input embedding must reach the tied head's logits.
    /// </summary>
    public bool UntiesHead { get; init; }

    /// <summary>trainable_token_indices resolved: module path and rows.</summary>
    public List<(string path, IReadOnlyList<long> indices)> TokenLayers { get; init; } = [];

    /// <summary>The tied output head that follows the input embedding's trainable rows (PEFT's tied_adapter), or null.</summary>
    public string? TiedTokenHead { get; init; }

    /// <summary>The LoRA variant every layer of the adapter uses (DoRA), or null for plain LoRA.</summary>
    public ILoraVariant? Variant { get; init; }

    public static AdapterPlan Create(IAdaptableModel model, LoraOptions options)
    {
        options.Validate();
        var targets = TargetResolver.EffectiveTargets(model, options.TargetModules, "LoRA");
        var paths = TargetResolver.Resolve(model, options.Selection(targets), "LoRA");
        // PEFT's rule: true when a target keeps its weight in×out (GPT-2's Conv1D), false for Linear (out×in).
        options.FanInFanOut = paths.Any(p => TargetResolver.IsConv1D(model.Root.get_submodule(p)));
        var (saved, headCopy) = ResolveSaved(model, options.ModulesToSave ?? []);
        var (tokens, tiedHead) = ResolveTokens(model, options, paths);
        if (headCopy && tiedHead is not null)
            throw LoraOptions.Bad("trainable_token_indices", "on this tied model the output head follows the embedding's trainable rows, and " +
                "modules_to_save trains a whole copy of the head too; use one of the two");
        return new AdapterPlan
        {
            Options = options,
            Targets = targets,
            Layers = paths.Select(p => (p, options.RankFor(p), options.AlphaFor(p))).ToList(),
            SavedPaths = saved,
            Variant = options.ResolveLoraVariant(),
            // PEFT's default (ensure_weight_tying false): a copy of the tied input embedding trains the input side only;
            // the head keeps the original table, so it needs a module of its own holding it.
            UntiesHead = headCopy || tiedHead is not null
                         || (model is ITiedOutputHead { OutputHeadTied: true } tied && saved.Contains(tied.InputEmbeddingsPath)),
            TokenLayers = tokens,
            TiedTokenHead = tiedHead,
        };
    }

    // A name that means the tied head of the model (which has no module until untied).
    private static bool IsTiedHead(IAdaptableModel model, string name) =>
        model is ITiedOutputHead { OutputHeadTied: true } t && (t.OutputHeadPath == name || t.OutputHeadPath.EndsWith("." + name, StringComparison.Ordinal));

    private static (List<string> paths, bool headCopy) ResolveSaved(IAdaptableModel model, List<string> names)
    {
        var result = new List<string>();
        var headCopy = false;
        foreach (var name in names)
        {
            var matches = TargetResolver.Candidates(model.Root)
                .Where(c => c.path == name || c.path.EndsWith("." + name, StringComparison.Ordinal)).ToList();
            if (matches.Count == 0 && IsTiedHead(model, name))
            {
                // PEFT copies the tied head (an untied, trainable copy; the embedding stays frozen).
                var head = ((ITiedOutputHead)model).OutputHeadPath;
                if (!result.Contains(head)) result.Add(head);
                headCopy = true;
                continue;
            }
            if (matches.Count == 0 && name == "lm_head")
                throw LoraOptions.Bad("modules_to_save", "entry 'lm_head' matches no module: this model computes logits with its embedding table " +
                    "and cannot give the head a module of its own (it does not implement ITiedOutputHead). Use [\"embed_tokens\"] to train the " +
                    "shared table, which changes both the input embedding and the output head");
            if (matches.Count == 0)
                throw LoraOptions.Bad("modules_to_save", $"entry '{name}' matches no module; top-level modules here: " +
                    string.Join(", ", model.Root.named_children().Select(c => c.name)) + ", and e.g. " +
                    string.Join(", ", TargetResolver.Candidates(model.Root).Select(c => c.path).Where(p => p.Contains('.')).Take(6)));
            foreach (var (path, module) in matches)
            {
                if (module is TunerLayer)
                    throw LoraOptions.Bad("modules_to_save", $"entry '{name}' matches '{path}', which carries an adapter already");
                if (!result.Contains(path)) result.Add(path);
            }
        }
        return (result, headCopy);
    }

    // PEFT's set_additional_trainable_modules for trainable_token_indices: the list form means the input embedding; on a
    // tied model the output head follows the embedding's rows (named again with the same rows it is skipped, as PEFT).
    private static (List<(string, IReadOnlyList<long>)> layers, string? tiedHead) ResolveTokens(IAdaptableModel model, LoraOptions options, List<string> adapted)
    {
        var result = new List<(string, IReadOnlyList<long>)>();
        if (options.TrainableTokenIndices is not { } spec) return (result, null);
        var tied = model as ITiedOutputHead;
        var entries = spec.Entries.ToList();
        var inputEmbedding = tied?.InputEmbeddingsPath ?? TargetResolver.Candidates(model.Root)
            .Select(c => c.path).FirstOrDefault(p => p == "embed_tokens" || p.EndsWith(".embed_tokens", StringComparison.Ordinal));
        IReadOnlyList<long>? embeddingRows = null;
        foreach (var (name, indices) in entries.Where(e => e.module is null || !IsTiedHead(model, e.module)))
        {
            List<string> paths;
            if (name is null)
                paths = inputEmbedding is not null ? [inputEmbedding]
                    : throw LoraOptions.Bad("trainable_token_indices", "the list form trains rows of the input embedding, and this model has no " +
                        "module named embed_tokens; give a dict naming the embedding, e.g. {\"wte\": [0, 1]}");
            else
            {
                paths = TargetResolver.Candidates(model.Root).Select(c => c.path)
                    .Where(p => p == name || p.EndsWith("." + name, StringComparison.Ordinal)).ToList();
                if (paths.Count == 0)
                    throw LoraOptions.Bad("trainable_token_indices", $"'{name}' matches no module; embeddings here: " +
                        string.Join(", ", model.Root.named_modules().Where(m => m.module is TorchSharp.Modules.Embedding).Select(m => m.name)));
            }
            foreach (var path in paths)
            {
                var module = model.Root.get_submodule(path);
                if (module is not (TorchSharp.Modules.Embedding or TorchSharp.Modules.Linear or TrainableTokensLayer))
                    throw LoraOptions.Bad("trainable_token_indices", $"'{path}' is a {module?.TypeName()}; trainable tokens apply to an Embedding " +
                        "or a Linear output head");
                if (adapted.Contains(path))
                    throw LoraOptions.Bad("trainable_token_indices", $"'{path}' is a LoRA target too; a module takes one of the two");
                var rows = module.get_parameter("weight")?.size(0) ?? 0;
                if (indices.FirstOrDefault(i => i >= rows, -1) is var outside and >= 0)
                    throw LoraOptions.Bad("trainable_token_indices", $"token id {outside} is out of range for '{path}', which has {rows} rows");
                if (path == inputEmbedding) embeddingRows = indices;
                result.Add((path, indices));
            }
        }
        if (tied is not { OutputHeadTied: true } || embeddingRows is null)
        {
            if (entries.FirstOrDefault(e => e.module is not null && IsTiedHead(model, e.module)) is { module: { } head })
                throw LoraOptions.Bad("trainable_token_indices", $"'{head}' is this model's tied output head, which follows the input embedding's " +
                    "rows: list the rows for the embedding instead");
            return (result, null);
        }
        foreach (var (name, indices) in entries.Where(e => e.module is not null && IsTiedHead(model, e.module)))
            if (!indices.SequenceEqual(embeddingRows))
                throw LoraOptions.Bad("trainable_token_indices", $"'{name}' is tied to the input embedding and gets other rows than it; tied " +
                    "layers share one table, so give them the same rows (or name only the embedding)");
        return (result, tied.OutputHeadPath);
    }

    /// <summary>PEFT keys of this adapter and their shapes (bias keys use the names the model will have once wrapped).</summary>
    public Dictionary<string, long[]> ExpectedShapes(torch.nn.Module root, IEnumerable<(string name, long[] shape)> trainableBiases)
    {
        var shapes = new Dictionary<string, long[]>();
        foreach (var (path, r, _) in Layers)
        {
            var module = root.get_submodule(path);
            var linear = module is TunerLayer l ? l.base_linear : LinearLayer.From(module)
                ?? throw new InvalidOperationException($"'{path}' is a {module?.TypeName() ?? "missing module"}, not a Linear");
            shapes[PeftKeys.LoraA(path)] = [r, linear.in_features];
            shapes[PeftKeys.LoraB(path)] = [linear.out_features, r];
            if (Options.LoraBias) shapes[PeftKeys.Parameter(path + ".lora_B.bias")] = [linear.out_features];
            foreach (var (key, shape) in Variant?.Shapes(linear, r) ?? [])
                shapes[PeftKeys.Parameter(path + "." + key)] = shape;
        }
        foreach (var path in SavedPaths)
        {
            if (root.get_submodule(path) is { } module)
                foreach (var (name, p) in module.named_parameters())
                    shapes[PeftKeys.Parameter(path + "." + name)] = p.shape;
            else if (UntiesHead && root is ITiedOutputHead tied && path == tied.OutputHeadPath)
                shapes[PeftKeys.Parameter(path + ".weight")] = root.get_submodule(tied.InputEmbeddingsPath)!.get_parameter("weight")!.shape;
        }
        foreach (var (path, indices) in TokenLayers)
        {
            var weight = root.get_submodule(path)!.get_parameter("weight")!;
            shapes[PeftKeys.TrainableTokens(path)] = [indices.Count, weight.size(1)];
        }
        foreach (var (name, shape) in trainableBiases) shapes[PeftKeys.Parameter(name)] = shape;
        return shapes;
    }
}
