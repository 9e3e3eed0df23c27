using System.Text.RegularExpressions;
using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using TorchSharp;

namespace LoRAHub.Plugins.LoRA;

/// <summary>Finds the modules an adapter's options select, as PEFT's inject_adapter does.</summary>
internal static class TargetResolver
{
    // PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the architectures LoRAHub loads.
    private static readonly Dictionary<string, string[]> DefaultTargets = new(StringComparer.OrdinalIgnoreCase)
    {
        ["llama"] = ["q_proj", "v_proj"],
        ["mistral"] = ["q_proj", "v_proj"],
        ["qwen2"] = ["q_proj", "v_proj"],
        ["qwen3"] = ["q_proj", "v_proj"],
        ["gemma"] = ["q_proj", "v_proj"],
        ["gemma2"] = ["q_proj", "v_proj"],
    };

    /// <summary>
    /// The target spec with defaults applied and "all-linear" expanded to the names of the Linear layers (minus the
    /// output heads), which is what PEFT records in adapter_config.json.
    /// </summary>
    public static TargetModuleSpec EffectiveTargets(IAdaptableModel model, LoraOptions options)
    {
        var spec = options.TargetModules;
        if (spec == null)
        {
            if (!DefaultTargets.TryGetValue(model.ModelType, out var defaults))
                throw LoraOptions.Bad("target_modules", $"is required for model type '{model.ModelType}' (no PEFT default); " +
                    $"for example [\"q_proj\", \"v_proj\"] or \"all-linear\". Linear layers here: {DescribeLinears(model)}");
            return TargetModuleSpec.FromNames(defaults);
        }
        if (!spec.IsAllLinear) return spec;
        var heads = model.OutputModuleNames.Select(LastName).ToHashSet();
        var names = Candidates(model.Root)
            .Where(c => IsLinear(c.module) && !model.OutputModuleNames.Contains(c.path))
            .Select(c => LastName(c.path)).Where(n => !heads.Contains(n)).Distinct().Order(StringComparer.Ordinal).ToList();
        if (names.Count == 0) throw LoraOptions.Bad("target_modules", "is 'all-linear' but the model has no Linear layer besides its output head");
        return TargetModuleSpec.FromNames(names);
    }

    /// <summary>Paths of the Linear (or already LoRA-wrapped) modules to adapt; throws when none or a non-Linear matches.</summary>
    public static List<string> Resolve(IAdaptableModel model, LoraOptions options, TargetModuleSpec targets)
    {
        var saved = options.ModulesToSave ?? [];
        var result = new List<string>();
        foreach (var (path, module) in Candidates(model.Root))
        {
            if (!targets.Matches(path)) continue;
            if (options.ExcludeModules?.Matches(path) == true) continue;
            // PEFT never adapts a module that is also saved whole (modules_to_save), nor anything inside one.
            if (saved.Any(m => Regex.IsMatch(path, $"(^|.*\\.){m}($|\\..*)"))) continue;
            if (!IsLinear(module))
                throw LoraOptions.Bad("target_modules", $"{targets} matches '{path}', a {module.TypeName()}; LoRA adapts Linear layers only. " +
                    $"Linear layers here: {DescribeLinears(model)}");
            result.Add(path);
        }
        if (result.Count == 0)
            throw LoraOptions.Bad("target_modules", $"{targets} matches no module of the model. Linear layers here: {DescribeLinears(model)}");
        return result;
    }

    /// <summary>
    /// Every module path except the root and the insides of LoRA layers (their base_layer, lora_A, ...), parents before
    /// their children (PyTorch's named_modules order; TorchSharp's lists a module's children before their subtrees).
    /// </summary>
    internal static IEnumerable<(string path, torch.nn.Module module)> Candidates(torch.nn.Module root)
    {
        foreach (var (name, child) in root.named_children())
        {
            yield return (name, child);
            if (child is LoraLinear) continue;
            foreach (var (path, module) in Candidates(child)) yield return (name + "." + path, module);
        }
    }

    private static bool IsLinear(torch.nn.Module m) => m is LoraLinear || LinearLayer.IsLinear(m);

    /// <summary>GPT-2's Conv1D (weight stored in×out), bare or inside a LoRA layer.</summary>
    internal static bool IsConv1D(torch.nn.Module? m) => (m is LoraLinear l ? l.base_layer : m)?.TypeName() == "Conv1D";

    private static string LastName(string path) => path[(path.LastIndexOf('.') + 1)..];

    private static string DescribeLinears(IAdaptableModel model)
    {
        var paths = Candidates(model.Root).Where(c => IsLinear(c.module)).Select(c => c.path).ToList();
        if (paths.Count == 0) return "none";
        var names = paths.Select(LastName).Distinct();
        return $"names [{string.Join(", ", names)}], e.g. {string.Join(", ", paths.Take(4))}{(paths.Count > 4 ? ", ..." : "")}";
    }
}
