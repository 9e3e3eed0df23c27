using LoRAHub.Abstractions;

namespace LoRAHub.Plugins.HeadLoRA;

/// <summary>
/// The width of one attention head: the head_dim option, else the model's config as transformers names it (LoRAHub's
/// model classes expose a <c>Config</c> with <c>HeadDim</c>, or hidden size over the number of attention heads). Read by
/// name, so any model family whose config follows transformers' names works without this plugin knowing it.
/// </summary>
internal static class HeadGeometry
{
    public static int HeadDim(IAdaptableModel model, HeadLoraOptions options)
    {
        if (options.HeadDim is { } explicitDim) return explicitDim;
        var config = model.GetType().GetProperty("Config")?.GetValue(model);
        if (Int(config, "HeadDim") is { } hd and > 0) return hd;
        if (Int(config, "HiddenSize") is { } hidden && Int(config, "NumAttentionHeads") is { } heads and > 0 && hidden % heads == 0) return hidden / heads;
        throw HeadLoraOptions.Bad("head_dim", $"is needed: the model ({model.ModelType}, {model.GetType().Name}) does not expose its attention " +
            "geometry (a Config with HeadDim or HiddenSize and NumAttentionHeads); set head_dim to the width of one head (hidden_size / num_attention_heads)");
    }

    private static int? Int(object? config, string name) => config?.GetType().GetProperty(name)?.GetValue(config) switch
    {
        int i => i,
        long l => (int)l,
        _ => null,
    };
}
