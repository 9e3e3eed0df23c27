using LoRAHub.Abstractions;

namespace LoRAHub.Host.Plugins;

/// <summary>A loaded method and where it came from (what `loraHub methods` lists).</summary>
public sealed record PluginMethod(IAdapterMethod Method, string PluginName, string Folder, string Version, string ContractVersion)
{
    public string Name => Method.Name;
    public string Description => Method.Description;
}
