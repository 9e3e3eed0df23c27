using System.Diagnostics.CodeAnalysis;
using LoRAHub.Abstractions;

namespace LoRAHub.Host.Plugins;

/// <summary>The methods the host found, by case-insensitive name, and the plugins it had to skip.</summary>
public interface IMethodRegistry
{
    /// <summary>The method with this name; throws <see cref="KeyNotFoundException"/> naming the available ones.</summary>
    IAdapterMethod Get(string name);

    bool TryGet(string name, [MaybeNullWhen(false)] out PluginMethod method);

    /// <summary>
    /// The one method that claims a saved adapter folder (<see cref="IAdapterMethod.Claims"/>), so that a folder loads
    /// without naming its method, as PEFT picks it from peft_type. Throws when no method or several claim it; a model
    /// folder (config.json, no adapter_config.json) that none claims is an ArgumentException saying so.
    /// </summary>
    IAdapterMethod ForFolder(string directory);

    IReadOnlyList<PluginMethod> All { get; }

    IReadOnlyList<BrokenPlugin> Broken { get; }
}
