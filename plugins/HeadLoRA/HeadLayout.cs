namespace LoRAHub.Plugins.HeadLoRA;

/// <summary>How a projection's weight is split by attention head.</summary>
public enum HeadSplit
{
    /// <summary>Not split: a plain LoRA layer (an MLP projection).</summary>
    None,

    /// <summary>The output rows are split (q, k, v): head h's rows get B_h·A_h, A_h reading the whole input.</summary>
    Output,

    /// <summary>The input columns are split (o): B_h·A_h reads head h's slice of the input.</summary>
    Input,
}

/// <summary>
/// The block structure of one adapted layer: its split, the head width and the rank of each head's adapter. The rank-1
/// components of all heads are packed head after head (head h owns components Offsets[h] .. Offsets[h] + Ranks[h]), so
/// the packed A and B of a layer hold exactly Σ r_h components.
/// </summary>
public sealed class HeadLayout
{
    public HeadLayout(HeadSplit split, int headDim, IReadOnlyList<int> ranks)
    {
        Split = split;
        HeadDim = headDim;
        Ranks = ranks.ToArray();
        Offsets = new int[Ranks.Length];
        for (var h = 1; h < Ranks.Length; h++) Offsets[h] = Offsets[h - 1] + Ranks[h - 1];
        Rank = Ranks.Sum();
        MaxRank = Ranks.Length == 0 ? 0 : Ranks.Max();
    }

    public HeadSplit Split { get; }

    /// <summary>Width of one head (0 for a plain layer).</summary>
    public int HeadDim { get; }

    /// <summary>Rank of each head's adapter (one entry for a plain layer).</summary>
    public int[] Ranks { get; }

    public int[] Offsets { get; }

    /// <summary>Number of heads (blocks) of the split side; 1 for a plain layer.</summary>
    public int Heads => Ranks.Length;

    /// <summary>Total rank Σ r_h: the rank of the equivalent plain LoRA.</summary>
    public int Rank { get; }

    public int MaxRank { get; }

    /// <summary>Every head has the same rank, so the packed components reshape to (heads, r) without padding.</summary>
    public bool Uniform => Ranks.All(r => r == MaxRank);

    /// <summary>The head of each packed component.</summary>
    public long[] HeadOfComponent() => Ranks.SelectMany((r, h) => Enumerable.Repeat((long)h, r)).ToArray();

    /// <summary>
    /// For each slot of the padded (heads × max rank) layout, the packed component it holds, or <see cref="Rank"/> (a zero
    /// column appended after the packed ones) for padding.
    /// </summary>
    public long[] PadIndex()
    {
        var index = new long[Heads * MaxRank];
        for (var h = 0; h < Heads; h++)
            for (var j = 0; j < MaxRank; j++)
                index[h * MaxRank + j] = j < Ranks[h] ? Offsets[h] + j : Rank;
        return index;
    }

    /// <summary>For each packed component, its slot in the padded (heads × max rank) layout.</summary>
    public long[] UnpadIndex() => Ranks.SelectMany((r, h) => Enumerable.Range(0, r).Select(j => (long)(h * MaxRank + j))).ToArray();

    /// <summary>
    /// The layout of a projection with <paramref name="inFeatures"/> → <paramref name="outFeatures"/>: the split side must
    /// be a whole number of heads, and <paramref name="ranks"/> (null: <paramref name="defaultRank"/> for every head) must
    /// list one rank per head. Errors name the module, the option and the fix.
    /// </summary>
    public static HeadLayout For(string path, HeadSplit split, long inFeatures, long outFeatures, int headDim, IReadOnlyList<int>? ranks, int defaultRank)
    {
        if (split == HeadSplit.None)
        {
            if (ranks is { Count: not 1 })
                throw HeadLoraOptions.Bad("head_ranks", $"for '{path}' lists {ranks.Count} ranks, but it is not split by head (not in head_output_modules " +
                    "or head_input_modules): give one rank");
            return new HeadLayout(split, 0, [ranks?[0] ?? defaultRank]);
        }
        var side = split == HeadSplit.Output ? outFeatures : inFeatures;
        var sideName = split == HeadSplit.Output ? "out_features" : "in_features";
        if (side % headDim != 0)
            throw HeadLoraOptions.Bad("head_dim", $"{headDim} does not divide {sideName} {side} of '{path}'; set head_dim to the model's head width " +
                "or leave the module out of head_output_modules/head_input_modules");
        var heads = (int)(side / headDim);
        if (ranks is not null && ranks.Count != heads)
            throw HeadLoraOptions.Bad("head_ranks", $"for '{path}' lists {ranks.Count} ranks, but it has {heads} heads ({sideName} {side} / head_dim {headDim}); " +
                "give one rank per head (k/v: per key-value head)");
        return new HeadLayout(split, headDim, ranks ?? Enumerable.Repeat(defaultRank, heads).ToList());
    }
}
