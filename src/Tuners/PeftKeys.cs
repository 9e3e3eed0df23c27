namespace LoRAHub.Tuners;

/// <summary>State-dict key names as PEFT saves them: "base_model.model." + module path, adapter name removed.</summary>
public static class PeftKeys
{
    public const string Prefix = "base_model.model.";

    /// <summary>A saved key for a tensor of the model by its dotted name ("…q_proj.lora_A.weight", "lm_head.weight").</summary>
    public static string Parameter(string name) => Prefix + name;

    public static string LoraA(string path) => Parameter(path + ".lora_A.weight");
    public static string LoraB(string path) => Parameter(path + ".lora_B.weight");

    /// <summary>trainable_token_indices rows of the module at <paramref name="path"/> (PEFT's TrainableTokensWrapper key).</summary>
    public static string TrainableTokens(string path) => Parameter(path + ".token_adapter.trainable_tokens_delta");
}
