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

    /// <summary>The LoRA variant every layer of the adapter uses (DoRA), or null for plain LoRA.</summary>
    public ILoraVariant? Variant { get; init; }

    public static AdapterPlan Create(IAdaptableModel model, LoraOptions options)
    {
        options.Validate();
        var targets = TargetResolver.EffectiveTargets(model, options.TargetModules, "LoRA");
        var paths = TargetResolver.Resolve(model, options.Selection(targets), "LoRA");
        // PEFT's rule: true when a target keeps its weight in×out (GPT-2's Conv1D), false for Linear (out×in).
        options.FanInFanOut = paths.Any(p => TargetResolver.IsConv1D(model.Root.get_submodule(p)));
        return new AdapterPlan
        {
            Options = options,
            Targets = targets,
            Layers = paths.Select(p => (p, options.RankFor(p), options.AlphaFor(p))).ToList(),
            SavedPaths = ResolveSaved(model, options.ModulesToSave ?? []),
            Variant = options.ResolveLoraVariant(),
        };
    }

    private static List<string> ResolveSaved(IAdaptableModel model, List<string> names)
    {
        var result = new List<string>();
        foreach (var name in names)
        {
            var matches = TargetResolver.Candidates(model.Root)
                .Where(c => c.path == name || c.path.EndsWith("." + name, StringComparison.Ordinal)).ToList();
            if (matches.Count == 0 && name == "lm_head")
                throw LoraOptions.Bad("modules_to_save", "entry 'lm_head' matches no module: this model ties its output head to the input " +
                    "embedding (tie_word_embeddings) and computes logits with the embedding table, so it has no separate lm_head to copy " +
                    "(PEFT would train an untied copy, which LoRAHub does not do yet). Use [\"embed_tokens\"] (GPT-2: [\"wte\"]) to train the " +
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
        return result;
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
            foreach (var (name, p) in root.get_submodule(path)!.named_parameters())
                shapes[PeftKeys.Parameter(path + "." + name)] = p.shape;
        foreach (var (name, shape) in trainableBiases) shapes[PeftKeys.Parameter(name)] = shape;
        return shapes;
    }
}
