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
        if (!Directory.Exists(directory)) throw new DirectoryNotFoundException($"adapter folder not found: {directory}");
        var claiming = All.Where(m => Claims(m, directory)).ToList();
        if (claiming.Count == 1) return claiming[0].Method;
        var files = string.Join(", ", Directory.EnumerateFiles(directory).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        if (claiming.Count == 0)
            throw new KeyNotFoundException(
                $"no method claims the adapter folder {directory} (files: {(files.Length == 0 ? "none" : files)}); " +
                $"methods: {string.Join(", ", All.Select(m => m.Name))}. Name its method: Method(\"name\").Load(model, folder)");
        // Two plugins reading one format the same way is a plugin bug: loading either could silently be the wrong one.
        throw new InvalidOperationException(
            $"several methods claim the adapter folder {directory}: {string.Join(", ", claiming.Select(m => $"{m.Name} ({m.PluginName})"))}; " +
            "exactly one must. Name its method: Method(\"name\").Load(model, folder)");
    }

    private static bool Claims(PluginMethod method, string directory)
    {
        try
        {
            return method.Method.Claims(directory);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            throw new InvalidOperationException($"method {method.Name} ({method.PluginName}) failed to inspect {directory}: {e.Message}", e);
        }
    }
}
