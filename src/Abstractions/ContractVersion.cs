namespace LoRAHub.Abstractions;

/// <summary>
/// Version of the plugin contract. The host loads a plugin whose <see cref="AdapterPluginAttribute.ContractMajor"/>
/// equals <see cref="Major"/> and whose minor is not newer than the host's.
/// </summary>
public static class ContractVersion
{
    public const int Major = 1;
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
