using LoRAHub.Tuners;
using System.Diagnostics.CodeAnalysis;
using LoRAHub.Abstractions;

namespace LoRAHub.Host.Plugins;

public sealed class MethodRegistry : IMethodRegistry
{
    private readonly Dictionary<string, PluginMethod> byName;

    public MethodRegistry(IReadOnlyList<PluginMethod> methods, IReadOnlyList<BrokenPlugin> broken)
    {
        All = methods;
        Broken = broken;
        byName = methods.ToDictionary(m => m.Name, StringComparer.OrdinalIgnoreCase);
    }

    public IReadOnlyList<PluginMethod> All { get; }
    public IReadOnlyList<BrokenPlugin> Broken { get; }

    public bool TryGet(string name, [MaybeNullWhen(false)] out PluginMethod method) => byName.TryGetValue(name, out method);

    public IAdapterMethod Get(string name)
    {
        if (TryGet(name, out var found)) return found.Method;
        var available = All.Count == 0 ? "none" : string.Join(", ", All.Select(m => m.Name));
        var broken = Broken.Count == 0 ? "" : $"; skipped plugins: {string.Join("; ", Broken.Select(b => $"{b.PluginName} ({b.Reason})"))}";
        throw new KeyNotFoundException($"no adaptation method named '{name}'; available: {available}{broken}");
    }

    public IAdapterMethod ForFolder(string directory)
    {
        string Label(IAdapterMethod method) => $"{method.Name} ({All.First(m => ReferenceEquals(m.Method, method)).PluginName})";
        return AdapterFolder.Claimant(All.Select(m => m.Method), directory, Label);
    }
}
