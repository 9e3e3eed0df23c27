using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace LoRAHub.Tuners.Lora;

/// <summary>
/// PEFT's init_lora_weights: true (A Kaiming-uniform with a = √5, B = 0), "gaussian" (A ~ N(0, σ = 1/r), B = 0),
/// false (A and B both keep nn.Linear's random init, so the adapter is not a no-op; for tests), "orthogonal" (A and B
/// from orthogonal halves of one random basis, so B·A = 0), and the inits that rewrite the base weight so the model is
/// unchanged: "pissa" (principal singular vectors), "pissa_niter_N" (the same by randomized SVD with N subspace
/// iterations) and "olora" (QR), and "loftq" (LoftQ: the base becomes its 4-bit NF4 quantization chosen jointly with the
/// adapter, see <see cref="Lora.LoftQ"/>; loftq_config gives the iterations). "corda", "eva", "lora_ga" need data and
/// are refused by name.
/// </summary>
[JsonConverter(typeof(LoraInitConverter))]
public sealed class LoraInit : IEquatable<LoraInit>
{
    public static readonly LoraInit Default = new("true");
    public static readonly LoraInit Gaussian = new("gaussian");
    public static readonly LoraInit Random = new("false");
    public static readonly LoraInit Pissa = new("pissa");
    public static readonly LoraInit Olora = new("olora");
    public static readonly LoraInit Orthogonal = new("orthogonal");
    public static readonly LoraInit LoftQ = new("loftq");

    // PEFT's other values: what each needs that LoRAHub lacks (the error names the field and this).
    private static readonly Dictionary<string, string> Unsupported = new()
    {
        ["corda"] = "CorDA needs activation statistics from a calibration set (corda_config); initialize with PEFT and load the converted adapter",
        ["eva"] = "EVA needs activation SVDs from data (eva_config); initialize with PEFT and load the trained adapter",
        ["lora_ga"] = "LoRA-GA needs gradient estimates from data (lora_ga_config); initialize with PEFT and load the converted adapter",
    };

    private LoraInit(string name, int? pissaNiter = null)
    {
        Name = name;
        PissaNiter = pissaNiter;
    }

    /// <summary>As adapter_config.json spells it: "true", "false", "gaussian", "pissa", "pissa_niter_4", "olora", "orthogonal".</summary>
    public string Name { get; }

    /// <summary>N of "pissa_niter_N" (randomized SVD); null otherwise.</summary>
    public int? PissaNiter { get; }

    public bool IsPissa => Name == "pissa" || PissaNiter is not null;

    /// <summary>LoftQ: the base is replaced by a 4-bit quantization chosen with the adapter (not a residual of B·A, so no conversion to plain LoRA).</summary>
    public bool IsLoftQ => Name == "loftq";

    /// <summary>PiSSA and OLoRA: the base weight becomes W − s·B·A, so such an adapter only fits that residual base.</summary>
    public bool ChangesBase => IsPissa || Name == "olora";

    public static LoraInit Parse(string text)
    {
        var name = text.Trim().ToLowerInvariant();
        switch (name)
        {
            case "true": return Default;
            case "false": return Random;
            case "gaussian": return Gaussian;
            case "pissa": return Pissa;
            case "olora": return Olora;
            case "orthogonal": return Orthogonal;
            case "loftq": return LoftQ;
        }
        if (name.StartsWith("pissa_niter_", StringComparison.Ordinal))
            return int.TryParse(name["pissa_niter_".Length..], NumberStyles.None, CultureInfo.InvariantCulture, out var n) && n >= 0
                ? new LoraInit(name, n)
                : throw new ArgumentException($"init_lora_weights '{text}': the number of subspace iterations after pissa_niter_ must be a non-negative integer");
        if (Unsupported.TryGetValue(name, out var why))
            throw new ArgumentException($"init_lora_weights '{text}' is not supported: {why}");
        throw new ArgumentException($"unknown init_lora_weights '{text}'; use true, false, \"gaussian\", \"pissa\", \"pissa_niter_N\", \"olora\", \"loftq\" or \"orthogonal\"");
    }

    public static implicit operator LoraInit(bool value) => value ? Default : Random;
    public static implicit operator LoraInit(string value) => Parse(value);

    /// <summary>The value as adapter_config.json stores it: a bool, or the string.</summary>
    public object JsonValue => Name switch { "true" => true, "false" => false, _ => Name };

    public bool Equals(LoraInit? other) => other is not null && other.Name == Name;
    public override bool Equals(object? obj) => Equals(obj as LoraInit);
    public override int GetHashCode() => Name.GetHashCode(StringComparison.Ordinal);
    public static bool operator ==(LoraInit? a, LoraInit? b) => a?.Equals(b) ?? b is null;
    public static bool operator !=(LoraInit? a, LoraInit? b) => !(a == b);

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
