namespace LoRAHub.Abstractions;

/// <summary>
/// Version of the plugin contract. The host loads a plugin whose <see cref="AdapterPluginAttribute.ContractMajor"/>
/// equals <see cref="Major"/> and whose minor is not newer than the host's.
/// 2.0: merge_and_unload, unload, the disable scope and folder claims on the contract; the tuner kit (LoRAHub.Tuners)
/// shared with plugins the way the contract is.
/// </summary>
public static class ContractVersion
{
    public const int Major = 2;
    public const int Minor = 0;

    public static string Text => $"{Major}.{Minor}";
}

/// <summary>Marks an assembly as a LoRAHub method plugin and states the contract version it was built against.</summary>
[AttributeUsage(AttributeTargets.Assembly)]
public sealed class AdapterPluginAttribute(int contractMajor, int contractMinor) : Attribute
{
    public int ContractMajor { get; } = contractMajor;
    public int ContractMinor { get; } = contractMinor;
}
