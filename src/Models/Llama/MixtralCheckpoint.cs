using System.Text.RegularExpressions;

namespace LoRAHub.Models.Llama;

/// <summary>
/// Mixtral checkpoints come in two layouts: per-expert Linear weights (block_sparse_moe.experts.E.w1/w2/w3, as on the Hub
/// and as our modules are named, so LoRA can target each expert) and transformers 5's fused experts
/// (mlp.experts.gate_up_proj of shape (E, 2·I, H) with gate rows first, mlp.experts.down_proj (E, H, I), mlp.gate.weight).
/// This maps one of our keys to where its values sit in the fused layout: each expert's w1, w3 and w2 is a contiguous
/// run of elements there, so loading stays tensor by tensor.
/// </summary>
public static partial class MixtralCheckpoint
{
    [GeneratedRegex(@"^model\.layers\.(\d+)\.block_sparse_moe\.(?:gate\.weight|experts\.(\d+)\.(w1|w2|w3)\.weight)$")]
    private static partial Regex OurKey();

    /// <summary>
    /// For one of our keys, the fused checkpoint key and the element offset of its values there; false when the key is
    /// not an expert or router weight or the checkpoint does not hold the fused layout.
    /// </summary>
    /// <param name="shapeOf">The checkpoint's shape of a key, or null when the checkpoint lacks it.</param>
    public static bool TryLocate(string key, Func<string, long[]?> shapeOf, out string source, out long elementOffset)
    {
        (source, elementOffset) = ("", 0);
        var m = OurKey().Match(key);
        if (!m.Success) return false;
        var prefix = $"model.layers.{m.Groups[1].Value}.mlp.";
        if (!m.Groups[2].Success)
        {
            source = prefix + "gate.weight";
            return shapeOf(source) is not null;
        }
        var expert = long.Parse(m.Groups[2].Value);
        if (m.Groups[3].Value == "w2")
        {
            source = prefix + "experts.down_proj";
            if (shapeOf(source) is not [_, var h, var i]) return false;
            elementOffset = expert * h * i;
            return true;
        }
        source = prefix + "experts.gate_up_proj";
        if (shapeOf(source) is not [_, var twoI, var hidden]) return false;
        var inter = twoI / 2;
        elementOffset = (expert * twoI + (m.Groups[3].Value == "w3" ? inter : 0)) * hidden;
        return true;
    }
}
