using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using TorchSharp;

namespace LoRAHub.Tuners;

/// <summary>
/// Finds the modules an adapter's options select, as PEFT's inject_adapter does: the one place every method's targeting
/// goes through (names, regex, "all-linear", exclude_modules, layers_to_transform + layers_pattern, modules_to_save).
/// Errors name the method's option and list the Linear layers the model has.
/// </summary>
public static class TargetResolver
{
    /// <summary>PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the architectures LoRAHub loads (AdaLoRA's is the same).</summary>
    public static IReadOnlyDictionary<string, string[]> LoraDefaults { get; } = new Dictionary<string, string[]>(StringComparer.OrdinalIgnoreCase)
    {
        ["llama"] = ["q_proj", "v_proj"],
        ["mistral"] = ["q_proj", "v_proj"],
        ["qwen2"] = ["q_proj", "v_proj"],
        ["qwen3"] = ["q_proj", "v_proj"],
        ["gemma"] = ["q_proj", "v_proj"],
        ["gemma2"] = ["q_proj", "v_proj"],
        ["gpt2"] = ["c_attn"],
    };

    /// <summary>"&lt;method&gt; option '&lt;option&gt;' &lt;problem&gt;": the one shape of option errors.</summary>
    public static AdapterConfigurationException Bad(string method, string option, string problem) => new($"{method} option '{option}' {problem}");

    /// <summary>
    /// The target spec with the model type's default applied when <paramref name="spec"/> is null, and "all-linear"
    /// expanded to the names of the Linear layers (minus the output heads), which is what PEFT records in adapter_config.json.
    /// </summary>
    public static TargetModuleSpec EffectiveTargets(IAdaptableModel model, TargetModuleSpec? spec, string method,
        IReadOnlyDictionary<string, string[]>? defaults = null)
    {
        if (spec == null)
        {
            if ((defaults ?? LoraDefaults).TryGetValue(model.ModelType, out var names)) return TargetModuleSpec.FromNames(names);
            throw Bad(method, "target_modules", $"is required for model type '{model.ModelType}' (no PEFT default); " +
                $"for example [\"q_proj\", \"v_proj\"] or \"all-linear\". Linear layers here: {DescribeLinears(model.Root)}");
        }
        if (!spec.IsAllLinear) return spec;
        var heads = model.OutputModuleNames.Select(LastName).ToHashSet();
        var linear = Candidates(model.Root)
            .Where(c => IsLinear(c.module) && !model.OutputModuleNames.Contains(c.path))
            .Select(c => LastName(c.path)).Where(n => !heads.Contains(n)).Distinct().Order(StringComparer.Ordinal).ToList();
        if (linear.Count == 0) throw Bad(method, "target_modules", "is 'all-linear' but the model has no Linear layer besides its output head");
        return TargetModuleSpec.FromNames(linear);
    }

    /// <summary>
    /// Paths of the Linear-like modules (or adapter layers wrapping one) the selection picks, parents before children.
    /// A selected module that is not Linear-like is an error unless <paramref name="skipOthers"/> (a pattern that also
    /// names containers, as GaLore's "attn"); selecting nothing is an error.
    /// </summary>
    public static List<string> Resolve(IAdaptableModel model, TargetSelection selection, string method, bool skipOthers = false)
    {
        var result = new List<string>();
        foreach (var (path, module) in Candidates(model.Root))
        {
            if (!selection.Matches(path)) continue;
            if (!IsLinear(module))
            {
                if (skipOthers) continue;
                throw Bad(method, "target_modules", $"{selection.TargetModules} matches '{path}', a {module.TypeName()}; {method} adapts Linear layers only. " +
                    $"Linear layers here: {DescribeLinears(model.Root)}");
            }
            result.Add(path);
        }
        if (result.Count == 0)
            throw Bad(method, "target_modules", $"{selection.TargetModules} matches no {(skipOthers ? "Linear layer" : "module")} of the model" +
                $"{(selection.LayersToTransform is { Count: > 0 } l ? $" in layers [{string.Join(", ", l)}]" : "")}. Linear layers here: {DescribeLinears(model.Root)}");
        return result;
    }

    /// <summary>
    /// Every module path except the root and the insides of adapter layers (their base_layer, lora_A, ...), each module
    /// once, parents before their children (PyTorch's named_modules order; TorchSharp's lists a module's children before
    /// their subtrees, and a module once per path that reaches it).
    /// </summary>
    public static IEnumerable<(string path, torch.nn.Module module)> Candidates(torch.nn.Module root)
    {
        var seen = new HashSet<torch.nn.Module>(ReferenceEqualityComparer.Instance);
        return Walk(root, "").Where(c => seen.Add(c.module));
    }

    private static IEnumerable<(string path, torch.nn.Module module)> Walk(torch.nn.Module parent, string prefix)
    {
        foreach (var (name, child) in parent.named_children())
        {
            var path = prefix + name;
            yield return (path, child);
            if (child is TunerLayer) continue;
            foreach (var inner in Walk(child, path + ".")) yield return inner;
        }
    }

    /// <summary>A Linear-like module (dense, 4-bit, GPT-2's Conv1D) or an adapter layer wrapping one.</summary>
    public static bool IsLinear(torch.nn.Module m) => m is TunerLayer || LinearLayer.IsLinear(m);

    /// <summary>GPT-2's Conv1D (weight stored in×out), bare or inside an adapter layer: PEFT records fan_in_fan_out for it.</summary>
    public static bool IsConv1D(torch.nn.Module? m) => (m is TunerLayer l ? l.base_layer : m)?.TypeName() == "Conv1D";

    public static string LastName(string path) => path[(path.LastIndexOf('.') + 1)..];

    /// <summary>"names [q_proj, v_proj, ...], e.g. model.layers.0.self_attn.q_proj, ..." for error messages.</summary>
    public static string DescribeLinears(torch.nn.Module root)
    {
        var paths = Candidates(root).Where(c => IsLinear(c.module)).Select(c => c.path).ToList();
        if (paths.Count == 0) return "none";
        var names = paths.Select(LastName).Distinct();
        return $"names [{string.Join(", ", names)}], e.g. {string.Join(", ", paths.Take(4))}{(paths.Count > 4 ? ", ..." : "")}";
    }
}
