using System.Text.RegularExpressions;

namespace LoRAHub.Tuners;

/// <summary>
/// What picks the modules an adapter adapts, as PEFT's configs spell it: target_modules, exclude_modules,
/// layers_to_transform with layers_pattern, and modules_to_save (saved whole, so never adapted).
/// </summary>
public sealed record TargetSelection
{
    /// <summary>Names or a regex; "all-linear" must be expanded (<see cref="TargetResolver.EffectiveTargets"/>) first.</summary>
    public required TargetModuleSpec TargetModules { get; init; }

    public TargetModuleSpec? ExcludeModules { get; init; }

    /// <summary>Layer indices to adapt (PEFT applies them to the list form of target_modules only); null or empty: all.</summary>
    public IReadOnlyList<int>? LayersToTransform { get; init; }

    /// <summary>Names of the layer list in the path ("layers", "h"); null or empty: the first numbered path segment.</summary>
    public IReadOnlyList<string>? LayersPattern { get; init; }

    public IReadOnlyList<string>? ModulesToSave { get; init; }

    /// <summary>PEFT's check_target_module_exists for one dotted module path.</summary>
    public bool Matches(string path)
    {
        if (ExcludeModules?.Matches(path) == true) return false;
        if (ModulesToSave?.Any(m => Regex.IsMatch(path, $"^(.*\\.)?{m}($|\\..*)", RegexOptions.CultureInvariant)) == true) return false;
        if (!TargetModules.Matches(path)) return false;
        if (TargetModules.Names is null || LayersToTransform is not { Count: > 0 } layers) return true;
        return LayerIndex(path) is { } index && layers.Contains(index);
    }

    /// <summary>
    /// The layer index in a path: the number after the first segment named by layers_pattern, or without one after the
    /// first numbered segment ("model.layers.3.mlp.up_proj" gives 3; lazily, so an expert index later on is never taken).
    /// </summary>
    public int? LayerIndex(string path)
    {
        var patterns = LayersPattern is { Count: > 0 } p ? p.Select(x => $@"^.*?\.{x}\.(\d+)\.") : [@"^.*?\.[^.]*\.(\d+)\."];
        foreach (var pattern in patterns)
            if (Regex.Match(path, pattern, RegexOptions.CultureInvariant) is { Success: true } m) return int.Parse(m.Groups[1].Value);
        return null;
    }
}
