using System.Reflection;
using System.Runtime.Loader;
using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using Microsoft.Extensions.Logging;
using TorchSharp;

namespace LoRAHub.Host.Scripting;

/// <summary>
/// The assemblies scripts compile against and the namespaces they import. Scripts see TorchSharp's own types
/// (<c>using TorchSharp; using static TorchSharp.torch;</c>: <c>torch.Tensor</c>, <c>nn.Module</c>, <c>optim</c>) and our
/// <c>torchx</c> for what TorchSharp lacks, so TorchSharp code and knowledge carry over. Registered in DI so that later
/// projects can add theirs; by default every <c>LoRAHub.*.dll</c> next to the host is referenced, so adding a library
/// to the host's output makes it available to scripts without host changes.
/// </summary>
public sealed class ScriptReferences
{
    /// <summary>
    /// Namespaces, and types imported as <c>using static</c> (TorchSharp.torch), kept when a referenced assembly has
    /// public types in them (so a missing project is not an error). The everyday ones are in: models, tokenizers and
    /// generation, the trainer and its data, and the host's merge/generate/eval/new/serve building blocks
    /// (LoRAHub.Host.Everyday), so a README example compiles as written.
    /// TorchSharp.Modules is left out: its AdamW, SGD and
    /// ParamGroup would clash with our optimizers' (LoRAHub.TorchExtensions.Optim, which adapters' parameter groups use);
    /// <c>nn.Linear(...)</c> and friends need no import, and a script may add <c>using TorchSharp.Modules;</c> itself.
    /// </summary>
    public static readonly IReadOnlyList<string> DefaultImports =
    [
        "System", "System.Linq", "System.IO", "System.Collections.Generic", "System.Threading.Tasks",
        "TorchSharp", "TorchSharp.torch", "LoRAHub.TorchExtensions", "LoRAHub.TorchExtensions.Optim",
        "LoRAHub.Abstractions", "LoRAHub.Models", "LoRAHub.Models.Tokenization", "LoRAHub.Models.Generation",
        "LoRAHub.Training", "LoRAHub.Training.Data", "LoRAHub.Host.Everyday", "Microsoft.Extensions.Logging",
    ];

    public List<Assembly> Assemblies { get; } = [];

    public List<string> Imports { get; } = [];

    public static ScriptReferences CreateDefault(string hostBaseDirectory)
    {
        var references = new ScriptReferences();
        references.Assemblies.AddRange(
        [
            typeof(object).Assembly, typeof(Enumerable).Assembly, typeof(torch).Assembly, typeof(torchx).Assembly,
            typeof(IAdapterMethod).Assembly, typeof(ILogger).Assembly, typeof(ScriptHost).Assembly,
            typeof(Microsoft.CSharp.RuntimeBinder.Binder).Assembly, // `dynamic` (else CS0656), as in dotnet-script and C# projects
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

    /// <summary>
    /// The imports that name a namespace with public types in the referenced assemblies, or a public static class
    /// (which Roslyn imports as <c>using static</c>).
    /// </summary>
    public IReadOnlyList<string> ExistingImports()
    {
        var types = Assemblies.SelectMany(PublicTypes).ToList();
        var names = types.Select(t => t.Namespace).OfType<string>()
            .Concat(types.Where(t => t is { IsAbstract: true, IsSealed: true, IsNested: false }).Select(t => t.FullName!))
            .ToHashSet(StringComparer.Ordinal);
        return Imports.Distinct().Where(names.Contains).ToList();
    }

    private static IEnumerable<Type> PublicTypes(Assembly assembly)
    {
        try
        {
            return assembly.GetExportedTypes();
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
