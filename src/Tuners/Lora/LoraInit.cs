using System.Text.Json;
using System.Text.Json.Serialization;

namespace LoRAHub.Tuners.Lora;

/// <summary>
/// PEFT's init_lora_weights: true (A Kaiming-uniform with a = √5, B = 0), "gaussian" (A ~ N(0, σ = 1/r), B = 0),
/// or false (A and B both keep nn.Linear's random init, so the adapter is not a no-op; for tests).
/// </summary>
[JsonConverter(typeof(LoraInitConverter))]
public sealed class LoraInit
{
    public static readonly LoraInit Default = new("true");
    public static readonly LoraInit Gaussian = new("gaussian");
    public static readonly LoraInit Random = new("false");

    private LoraInit(string name) => Name = name;

    /// <summary>"true", "false" or "gaussian".</summary>
    public string Name { get; }

    public static LoraInit Parse(string text) => text.Trim().ToLowerInvariant() switch
    {
        "true" => Default,
        "false" => Random,
        "gaussian" => Gaussian,
        _ => throw new ArgumentException($"unknown init_lora_weights '{text}'; use true, false or \"gaussian\""),
    };

    public static implicit operator LoraInit(bool value) => value ? Default : Random;
    public static implicit operator LoraInit(string value) => Parse(value);

    /// <summary>The value as adapter_config.json stores it: a bool, or the string.</summary>
    public object JsonValue => Name switch { "true" => true, "false" => false, _ => Name };

    public override string ToString() => Name;
}

public sealed class LoraInitConverter : JsonConverter<LoraInit>
{
    public override LoraInit Read(ref Utf8JsonReader reader, Type typeToConvert, JsonSerializerOptions options) => reader.TokenType switch
    {
        JsonTokenType.True => LoraInit.Default,
        JsonTokenType.False => LoraInit.Random,
        JsonTokenType.String => LoraInit.Parse(reader.GetString()!),
        _ => throw new JsonException("init_lora_weights must be true, false or a string"),
    };

    public override void Write(Utf8JsonWriter writer, LoraInit value, JsonSerializerOptions options)
    {
        if (value.JsonValue is bool b) writer.WriteBooleanValue(b);
        else writer.WriteStringValue(value.Name);
    }
}
