using LoRAHub.Tuners;

namespace MethodPlugin;

/// <summary>
/// The method's options. TargetOptions brings PEFT's target_modules, exclude_modules, layers_to_transform and
/// layers_pattern; every [ConfigKey] property is saved to and read from adapter_config.json under its key.
/// Scripts bind them by name: new { target_modules = new[] { "q_proj", "v_proj" } }.
/// </summary>
public sealed class MethodPluginOptions : TargetOptions
{
    public MethodPluginOptions() => TargetModules = TargetModuleSpec.AllLinear;

    /// <summary>Recorded in adapter_config.json.</summary>
    [ConfigKey("task_type")] public string TaskType { get; set; } = "CAUSAL_LM";

    /// <summary>Throws an AdapterConfigurationException naming the bad option.</summary>
    public void Validate() => ValidateTargets(MethodPluginMethod.DisplayName);
}
