using System.Reflection;
using System.Runtime.Loader;
using LoRAHub.Abstractions;
using LoRAHub.Torch;
using Microsoft.Extensions.Logging;

namespace LoRAHub.Host.Scripting;

/// <summary>
/// The assemblies scripts compile against and the namespaces they import. Registered in DI so that later projects
/// can add theirs; by default every <c>LoRAHub.*.dll</c> next to the host is referenced, so adding LoRAHub.Models or
/// LoRAHub.Training to the host's output makes them available to scripts without host changes.
/// </summary>
public sealed class ScriptReferences
{
    /// <summary>Imported when a referenced assembly has public types in them (so a missing project is not an error).</summary>
    public static readonly IReadOnlyList<string> DefaultImports =
    [
        "System", "System.Linq", "System.IO", "System.Collections.Generic", "System.Threading.Tasks",
        "LoRAHub.Torch", "LoRAHub.Torch.NN", "LoRAHub.Torch.Optim", "LoRAHub.Abstractions",
        "LoRAHub.Models", "LoRAHub.Training", "Microsoft.Extensions.Logging",
    ];

    public List<Assembly> Assemblies { get; } = [];

    public List<string> Imports { get; } = [];

    public static ScriptReferences CreateDefault(string hostBaseDirectory)
    {
        var references = new ScriptReferences();
        references.Assemblies.AddRange(
        [
            typeof(object).Assembly, typeof(Enumerable).Assembly, typeof(Tensor).Assembly, typeof(IAdapterMethod).Assembly,
            typeof(ILogger).Assembly, typeof(ScriptHost).Assembly,
        ]);
        foreach (var path in Directory.EnumerateFiles(hostBaseDirectory, "LoRAHub.*.dll").Order(StringComparer.Ordinal))
            references.Add(LoadFromHost(path));
        references.Imports.AddRange(DefaultImports);
        return references;
    }

    public void Add(Assembly assembly)
    {
        if (!Assemblies.Contains(assembly)) Assemblies.Add(assembly);
    }

    /// <summary>The imports that name a namespace with public types in the referenced assemblies.</summary>
    public IReadOnlyList<string> ExistingImports()
    {
        var namespaces = Assemblies.SelectMany(PublicNamespaces).ToHashSet(StringComparer.Ordinal);
        return Imports.Distinct().Where(namespaces.Contains).ToList();
    }

    private static IEnumerable<string> PublicNamespaces(Assembly assembly)
    {
        try
        {
            return assembly.GetExportedTypes().Select(t => t.Namespace).OfType<string>();
        }
        catch (Exception e) when (e is ReflectionTypeLoadException or FileNotFoundException)
        {
            return [];
        }
    }

    // The host's own dependencies are already in the default context; others (dropped in later) load from their path.
    private static Assembly LoadFromHost(string path)
    {
        var name = AssemblyName.GetAssemblyName(path);
        try
        {
            return AssemblyLoadContext.Default.LoadFromAssemblyName(name);
        }
        catch (FileNotFoundException)
        {
            return AssemblyLoadContext.Default.LoadFromAssemblyPath(path);
        }
    }
}
