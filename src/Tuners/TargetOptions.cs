using System.Text.Json.Serialization;

namespace LoRAHub.Tuners;

/// <summary>
/// The options every layer-injecting method selects its modules with, as PEFT's configs name them (target_modules,
/// exclude_modules, layers_to_transform, layers_pattern). Methods' options derive from it, so the selection is
/// declared, validated, saved and read once.
/// </summary>
public abstract class TargetOptions
{
    /// <summary>Names (suffix match), a full-path regex, or "all-linear". Null: the method's default for the model type.</summary>
    [ConfigKey("target_modules")] public TargetModuleSpec? TargetModules { get; set; }

    /// <summary>Modules never adapted, same spellings as target_modules.</summary>
    [ConfigKey("exclude_modules")] public TargetModuleSpec? ExcludeModules { get; set; }

    /// <summary>Only these layer indices are adapted (with a list of target_modules names); null: every layer.</summary>
    [ConfigKey("layers_to_transform"), JsonConverter(typeof(OneOrManyConverter<int>))]
    public List<int>? LayersToTransform { get; set; }

    /// <summary>Name of the layer list the indices count in ("layers", "h"); null: the first numbered path segment.</summary>
    [ConfigKey("layers_pattern"), JsonConverter(typeof(OneOrManyConverter<string>))]
    public List<string>? LayersPattern { get; set; }

    /// <summary>What selects the adapted modules, with <paramref name="targets"/> as the effective target_modules.</summary>
    public virtual TargetSelection Selection(TargetModuleSpec targets) => new()
    {
        TargetModules = targets,
        ExcludeModules = ExcludeModules,
        LayersToTransform = LayersToTransform,
        LayersPattern = LayersPattern,
    };

    /// <summary>Throws an option error of <paramref name="method"/> for a selection PEFT would refuse.</summary>
    protected void ValidateTargets(string method)
    {
        if (TargetModules?.Names is { Count: 0 }) throw TargetResolver.Bad(method, "target_modules", "is empty");
        if (ExcludeModules?.IsAllLinear == true) throw TargetResolver.Bad(method, "exclude_modules", "cannot be 'all-linear'");
        if (LayersToTransform?.Any(i => i < 0) == true)
            throw TargetResolver.Bad(method, "layers_to_transform", $"holds layer indices (0 and up), got [{string.Join(", ", LayersToTransform)}]");
        if (LayersPattern is { Count: > 0 } && LayersToTransform is not { Count: > 0 })
            throw TargetResolver.Bad(method, "layers_pattern", "only says where layers_to_transform counts layers; set layers_to_transform too");
        if (LayersToTransform is { Count: > 0 } && TargetModules?.Pattern is { } pattern && !TargetModules.IsAllLinear)
            throw TargetResolver.Bad(method, "layers_to_transform", $"applies to a list of target_modules names, not to a regex ('{pattern}'): put the layer indices in the regex");
    }
}
