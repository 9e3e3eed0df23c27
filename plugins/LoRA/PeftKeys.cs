namespace LoRAHub.Plugins.LoRA;

/// <summary>State-dict key names as PEFT saves them: "base_model.model." + module path, adapter name removed.</summary>
internal static class PeftKeys
{
    public const string Prefix = "base_model.model.";

    public static string LoraA(string path) => $"{Prefix}{path}.lora_A.weight";
    public static string LoraB(string path) => $"{Prefix}{path}.lora_B.weight";

    /// <summary>A parameter of the model by its current dotted name (biases, modules_to_save parameters).</summary>
    public static string Parameter(string name) => Prefix + name;
}
