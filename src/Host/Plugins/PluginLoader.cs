using System.Reflection;
using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using TorchSharp;
using McMasterPluginLoader = McMaster.NETCore.Plugins.PluginLoader;

namespace LoRAHub.Host.Plugins;

/// <summary>
/// Loads plugin folders into a <see cref="MethodRegistry"/>, each plugin through McMaster.NETCore.Plugins in its own
/// load context. Every failure is confined to its plugin: it is recorded in <see cref="IMethodRegistry.Broken"/> with
/// the reason and the remaining plugins still load.
/// </summary>
public sealed class PluginLoader(ILogger? logger = null)
{
    /// <summary>
    /// Types whose assemblies a plugin always takes from the host, so that they are one type on both sides: the contract,
    /// TorchSharp (torch.Tensor, nn.Module) and our extensions to it, the tuner kit plugins build on (its LoRA layer is
    /// one type whichever plugin made it), the model and trainer libraries whose types cross the contract, and the
    /// logging/DI abstractions so that a plugin accepting ILogger or IServiceProvider sees the host's interfaces.
    /// McMaster shares what these assemblies reference as well (LoRAHub.Safetensors, System.Text.Json, ...).
    /// Everything else a plugin ships (managed or native) is private to it.
    /// </summary>
    public static readonly IReadOnlyList<Type> DefaultSharedTypes =
    [
        typeof(IAdapterMethod),
        typeof(torch.Tensor),
        typeof(torchx),
        typeof(LoRAHub.Tuners.TunerLayer),
        typeof(LoRAHub.Models.PretrainedModel),
        typeof(LoRAHub.Training.Trainer),
        typeof(ILogger),
        typeof(IServiceCollection),
    ];

    private readonly ILogger log = logger ?? NullLogger.Instance;

    public IReadOnlyList<Type> SharedTypes { get; init; } = DefaultSharedTypes;

    /// <summary>Methods that ship inside the host (e.g. <c>full</c>); they win a name clash with any plugin.</summary>
    public IReadOnlyList<IAdapterMethod> BuiltInMethods { get; init; } = [];

    public MethodRegistry Load(IEnumerable<string> folders)
    {
        var builtIns = BuiltInMethods.Select(BuiltIn).ToList();
        var methods = new List<PluginMethod>();
        var broken = new List<BrokenPlugin>();
        foreach (var folder in folders)
        {
            var name = Path.GetFileName(Path.TrimEndingDirectorySeparator(folder));
            void Skip(string reason)
            {
                log.LogWarning("plugin {Plugin} skipped: {Reason} ({Folder})", name, reason, folder);
                broken.Add(new BrokenPlugin(name, folder, reason));
            }

            try
            {
                foreach (var method in LoadFolder(folder, name, Skip))
                {
                    var clash = builtIns.Concat(methods).FirstOrDefault(m => string.Equals(m.Name, method.Name, StringComparison.OrdinalIgnoreCase));
                    if (clash is not null)
                        Skip($"method name '{method.Name}' is already provided by plugin {clash.PluginName} ({clash.Folder})");
                    else
                    {
                        log.LogDebug("method {Method} {Version} loaded from {Folder}", method.Name, method.Version, folder);
                        methods.Add(method);
                    }
                }
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                Skip(Describe(e));
            }
        }
        // Plugins are listed first (they are what `loraHub methods` is mostly asked about), built-ins after them.
        return new MethodRegistry([.. methods, .. builtIns], broken);
    }

    private static PluginMethod BuiltIn(IAdapterMethod method) =>
        new(method, BuiltInPluginName, "(built in)", AssemblyVersion(method.GetType().Assembly), ContractVersion.Text);

    public const string BuiltInPluginName = "built-in";

    private List<PluginMethod> LoadFolder(string folder, string name, Action<string> skip)
    {
        if (!Directory.Exists(folder)) throw new PluginLoadException("folder not found");
        if (PluginTrust.Check(folder) is { } refused) throw new PluginLoadException(refused);
        var mainPath = FindMainAssembly(folder, name);
        // Not unloadable: plugins hold native tensors and live as long as the process. Native libraries a plugin carries
        // (listed in its deps.json or next to its DLL) are resolved by McMaster's load context for that plugin only.
        var loader = McMasterPluginLoader.CreateFromAssemblyFile(mainPath, [.. SharedTypes], config => config.IsUnloadable = false);
        Assembly assembly;
        try
        {
            assembly = loader.LoadDefaultAssembly();
        }
        catch (BadImageFormatException)
        {
            throw new PluginLoadException($"{Path.GetFileName(mainPath)} is not a .NET assembly (bad image format)");
        }

        var contract = CheckContractVersion(assembly);
        var version = AssemblyVersion(assembly);
        var methodTypes = MethodTypes(assembly);
        if (methodTypes.Count == 0)
            throw new PluginLoadException($"{assembly.GetName().Name} exports no public class implementing IAdapterMethod with a public parameterless constructor");

        var result = new List<PluginMethod>();
        foreach (var type in methodTypes)
        {
            // One bad method type does not take down the plugin's other methods.
            try
            {
                var method = (IAdapterMethod)Activator.CreateInstance(type)!;
                if (string.IsNullOrWhiteSpace(method.Name)) skip($"{type.FullName} has an empty Name");
                else result.Add(new PluginMethod(method, name, folder, version, contract));
            }
            catch (TargetInvocationException e) when (e.InnerException is { } inner)
            {
                skip($"{type.FullName} constructor threw {inner.GetType().Name}: {inner.Message}");
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                skip($"{type.FullName}: {Describe(e)}");
            }
        }
        return result;
    }

    private static string AssemblyVersion(Assembly assembly) =>
        assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion.Split('+')[0]
        ?? assembly.GetName().Version?.ToString() ?? "unknown";

    /// <summary><c>&lt;Folder&gt;.dll</c>, else the assembly named by the folder's single <c>*.deps.json</c>.</summary>
    private static string FindMainAssembly(string folder, string name)
    {
        var byFolderName = Path.Combine(folder, name + ".dll");
        if (File.Exists(byFolderName)) return byFolderName;
        var deps = Directory.GetFiles(folder, "*.deps.json");
        if (deps.Length > 1)
            throw new PluginLoadException($"no {name}.dll and several *.deps.json ({string.Join(", ", deps.Select(Path.GetFileName))}); cannot tell which assembly is the plugin");
        if (deps.Length == 1)
        {
            var candidate = Path.Combine(folder, Path.GetFileName(deps[0])[..^".deps.json".Length] + ".dll");
            if (File.Exists(candidate)) return candidate;
            throw new PluginLoadException($"{Path.GetFileName(deps[0])} names {Path.GetFileName(candidate)}, which is missing");
        }
        throw new PluginLoadException($"missing plugin assembly: expected {name}.dll or a *.deps.json naming the plugin's DLL");
    }

    /// <summary>Reads [assembly: AdapterPlugin] as data, so a plugin built against another contract is judged, not crashed on.</summary>
    private static string CheckContractVersion(Assembly assembly)
    {
        var attribute = assembly.GetCustomAttributesData()
            .FirstOrDefault(a => a.AttributeType.FullName == typeof(AdapterPluginAttribute).FullName)
            ?? throw new PluginLoadException($"{assembly.GetName().Name} is not a LoRAHub plugin: it lacks [assembly: AdapterPlugin(major, minor)]");
        var major = (int)attribute.ConstructorArguments[0].Value!;
        var minor = (int)attribute.ConstructorArguments[1].Value!;
        var text = $"{major}.{minor}";
        if (major != ContractVersion.Major)
            throw new PluginLoadException($"built for contract {text}; this host implements contract {ContractVersion.Text} (major versions must match)");
        if (minor > ContractVersion.Minor)
            throw new PluginLoadException($"built for contract {text}, newer than this host's {ContractVersion.Text}; update the host");
        return text;
    }

    private static List<Type> MethodTypes(Assembly assembly)
    {
        Type[] types;
        try
        {
            types = assembly.GetExportedTypes();
        }
        catch (ReflectionTypeLoadException e)
        {
            throw new PluginLoadException($"cannot load its types: {string.Join("; ", e.LoaderExceptions.OfType<Exception>().Select(x => x.Message).Distinct())}");
        }
        return types.Where(t => t is { IsClass: true, IsAbstract: false, IsGenericTypeDefinition: false }
                                && typeof(IAdapterMethod).IsAssignableFrom(t)
                                && t.GetConstructor(Type.EmptyTypes) is not null).ToList();
    }

    private static string Describe(Exception e)
    {
        while (e is TargetInvocationException { InnerException: { } inner }) e = inner;
        return e switch
        {
            PluginLoadException => e.Message,
            FileNotFoundException f => $"a dependency is missing: {f.FileName ?? f.Message}",
            _ => $"{e.GetType().Name}: {e.Message}",
        };
    }
}
