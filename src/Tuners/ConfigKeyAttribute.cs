namespace LoRAHub.Tuners;

/// <summary>
/// Marks an options property that a config file stores, under its key (PEFT's field name: "r", "lora_alpha", ...).
/// The marked properties of an options class are its one list of config fields: <see cref="ConfigFields"/> reads,
/// writes and copies from that list, so a new option is declared once.
/// </summary>
[AttributeUsage(AttributeTargets.Property)]
public sealed class ConfigKeyAttribute(string key) : Attribute
{
    public string Key { get; } = key;
}
