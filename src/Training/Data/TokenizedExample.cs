namespace LoRAHub.Training.Data;

/// <summary>One training sequence: token ids and per-token labels (-100 = no loss, e.g. prompt tokens).</summary>
public sealed record TokenizedExample(int[] InputIds, int[] Labels)
{
    public const int IgnoreIndex = -100;

    public int Length => InputIds.Length;

    /// <summary>Number of tokens that contribute to the loss.</summary>
    public int LabelCount => Labels.Count(l => l != IgnoreIndex);
}
