using System.Text.Json.Serialization;

namespace LoRAHub.Samples.BitFit;

/// <summary>adapter_config.json: what was trained and on which base model.</summary>
public sealed record BitFitConfig(
    [property: JsonPropertyName("peft_type")] string PeftType,
    [property: JsonPropertyName("base_model_name_or_path")] string BaseModel,
    [property: JsonPropertyName("model_type")] string ModelType,
    [property: JsonPropertyName("train_biases")] bool TrainBiases,
    [property: JsonPropertyName("train_norms")] bool TrainNorms);
