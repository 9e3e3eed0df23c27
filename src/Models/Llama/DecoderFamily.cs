namespace LoRAHub.Models.Llama;

/// <summary>
/// What sets one Llama-structured family apart from another, beyond config.json's numbers: each row is one of
/// transformers' model classes, and the model's modules read these switches (so every family is the same code).
/// </summary>
/// <param name="ModelType">config.json's model_type.</param>
/// <param name="Architecture">transformers' class, written to config.json's architectures.</param>
/// <param name="DefaultActivation">The MLP activation when config.json names none.</param>
/// <param name="DefaultTieWordEmbeddings">The class default transformers leaves out of config.json.</param>
/// <param name="GemmaNorm">RMSNorm scales by (1 + w), weights stored around zero, all in fp32 (Gemma).</param>
/// <param name="ScaledEmbeddings">Embeddings are multiplied by √hidden_size (Gemma).</param>
/// <param name="SandwichNorm">Norms after attention and the MLP as well as before them (Gemma's four norms a layer).</param>
/// <param name="QkNorm">An RMSNorm over each head of q and k before rotary embeddings (Qwen3, Gemma 3).</param>
/// <param name="FusedProjections">One qkv_proj and one gate_up_proj Linear instead of three and two (Phi-3).</param>
/// <param name="MixtureOfExperts">The MLP is a routed set of experts (Mixtral's block_sparse_moe).</param>
public sealed record DecoderFamily(string ModelType, string Architecture, string DefaultActivation = "silu",
    bool DefaultTieWordEmbeddings = false, bool GemmaNorm = false, bool ScaledEmbeddings = false, bool SandwichNorm = false,
    bool QkNorm = false, bool FusedProjections = false, bool MixtureOfExperts = false)
{
    private static readonly DecoderFamily[] All =
    [
        new("llama", "LlamaForCausalLM"),
        new("mistral", "MistralForCausalLM"),
        new("qwen2", "Qwen2ForCausalLM"),
        new("qwen3", "Qwen3ForCausalLM", QkNorm: true),
        new("gemma2", "Gemma2ForCausalLM", "gelu_pytorch_tanh", DefaultTieWordEmbeddings: true, GemmaNorm: true, ScaledEmbeddings: true, SandwichNorm: true),
        new("gemma3_text", "Gemma3ForCausalLM", "gelu_pytorch_tanh", DefaultTieWordEmbeddings: true, GemmaNorm: true, ScaledEmbeddings: true,
            SandwichNorm: true, QkNorm: true),
        new("phi3", "Phi3ForCausalLM", FusedProjections: true),
        new("mixtral", "MixtralForCausalLM", MixtureOfExperts: true),
    ];

    /// <summary>Every supported model_type.</summary>
    public static IReadOnlyList<string> ModelTypes { get; } = All.Select(f => f.ModelType).ToArray();

    /// <summary>The family of <paramref name="modelType"/>; an unsupported one is refused naming it and listing the supported ones.</summary>
    public static DecoderFamily Of(string modelType) => All.FirstOrDefault(f => f.ModelType == modelType)
        ?? throw new NotSupportedException($"model_type '{modelType}' is not supported; supported: {string.Join(", ", ModelTypes)}" +
            (modelType == "gemma3" ? " (for Gemma 3, load the text model: model_type gemma3_text, as Gemma3ForCausalLM saves it)" : ""));
}
