using System.Reflection;
using System.Runtime.Loader;

namespace LoRAHub.Host.Plugins;

/// <summary>
/// One plugin's assembly context. Shared assemblies (the contract and the tensor library) always come from the host so
/// that IAdapterMethod, Tensor and Module are the same types on both sides; everything else the plugin ships resolves
/// from its own folder first, so two plugins may carry different versions of one library.
/// Not collectible: plugins hold native tensors and live as long as the process.
/// </summary>
public sealed class PluginLoadContext(string mainAssemblyPath, IReadOnlySet<string> sharedAssemblyNames)
    : AssemblyLoadContext(Path.GetFileNameWithoutExtension(mainAssemblyPath), isCollectible: false)
{
    private readonly AssemblyDependencyResolver resolver = new(mainAssemblyPath);

    public string MainAssemblyPath { get; } = mainAssemblyPath;

    protected override Assembly? Load(AssemblyName assemblyName)
    {
        if (assemblyName.Name is { } name && sharedAssemblyNames.Contains(name)) return null;
        var path = resolver.ResolveAssemblyToPath(assemblyName);
        // Null falls back to the default context: the framework and whatever else the host has.
        return path is null ? null : LoadFromAssemblyPath(path);
    }

    protected override IntPtr LoadUnmanagedDll(string unmanagedDllName)
    {
        var path = resolver.ResolveUnmanagedDllToPath(unmanagedDllName);
        return path is null ? IntPtr.Zero : LoadUnmanagedDllFromPath(path);
    }
}
