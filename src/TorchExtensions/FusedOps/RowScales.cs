using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// The row scales of one fused call's projections (<see cref="LowRankParts.RowScale"/>,
/// <see cref="LowRankParts.DividedRowScale"/>): per projection the autograd input in the scale's place (c, or m for a
/// divided scale), c's values, and the divisor n whose quotient dc/n is m's gradient (null: the input is c itself).
/// </summary>
internal sealed class RowScales(int count)
{
    public readonly Tensor?[] Inputs = new Tensor?[count], Values = new Tensor?[count], Divisors = new Tensor?[count];
}
