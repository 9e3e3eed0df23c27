using LoRAHub.Tuners;

namespace LoRAHub.Plugins.GaLore;

/// <summary>GaLore's settings, named as in the reference implementation (jiaweizzhao/GaLore); galore_config.json holds them.</summary>
public sealed class GaLoreOptions
{
    /// <summary>Rank of the gradient projection (the paper uses 128 for 1B, 256 for 7B).</summary>
    [ConfigKey("rank")] public int rank { get; set; } = 128;

    /// <summary>Steps between projector recomputations from the gradient's SVD (T).</summary>
    [ConfigKey("update_proj_gap")] public int update_proj_gap { get; set; } = 200;

    /// <summary>α: the projected-back update is multiplied by this.</summary>
    [ConfigKey("scale")] public double scale { get; set; } = 0.25;

    /// <summary>"std" (right projection when rows ≥ cols, else left), or force "left" / "right".</summary>
    [ConfigKey("proj_type")] public string proj_type { get; set; } = "std";

    /// <summary>
    /// Modules whose 2-D weights get projected, matched on any path component ("attn", "mlp" as in the paper's
    /// scripts). Other parameters train with plain AdamW.
    /// </summary>
    [ConfigKey("target_modules")] public List<string> target_modules { get; set; } = ["attn", "mlp"];

    internal void Validate()
    {
        if (rank <= 0) throw new Abstractions.AdapterConfigurationException($"GaLore rank must be positive (got {rank})");
        if (update_proj_gap <= 0) throw new Abstractions.AdapterConfigurationException($"update_proj_gap must be positive (got {update_proj_gap})");
        if (proj_type is not ("std" or "left" or "right"))
            throw new Abstractions.AdapterConfigurationException($"proj_type '{proj_type}' is not one of std, left, right");
    }
}
