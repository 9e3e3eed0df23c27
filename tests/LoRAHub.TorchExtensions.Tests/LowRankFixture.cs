using LoRAHub.TorchExtensions.Modules;
using TorchSharp.Modules;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// A frozen Linear with an optional update, computed as LoRA's layer does (update in the input's dtype, one addmm), and
/// with <c>rowScale</c> a trainable fp32 scale c per output (DoRA with its norm detached: y = c ⊙ inner, the product in
/// fp32 rounded once to the input's dtype); with <c>divided</c> c = m/n for a trainable m and a fixed n (DoRA's
/// m/‖V‖, <see cref="LowRankParts.DividedRowScale"/>: m's gradient is dc/n).
/// </summary>
internal sealed class LowRankFixture : nn.Module<Tensor, Tensor>, ILowRankLinear
{
    private static readonly Device Dev = TestDevice.Current;

    private readonly Linear linear;
    private readonly Parameter? a, b, c;
    private readonly Tensor? n;
    private readonly double scale;

    public LowRankFixture(long inF, long outF, int rank, ScalarType dtype, Generator gen, bool rowScale = false, bool divided = false)
        : base("LowRank")
    {
        linear = nn.Linear(inF, outF, hasBias: false, device: Dev, dtype: dtype);
        using (no_grad()) linear.weight!.copy_(randn([outF, inF], generator: gen) / Math.Sqrt(inF));
        linear.weight!.requires_grad = false;
        if (rank > 0)
        {
            // An update as large as the base output (B ~ N(0, 1), s = 4/r): a wrong column or rank in the kernels' tiles
            // moves results far beyond bf16 rounding.
            a = new Parameter((randn([rank, inF], generator: gen) / Math.Sqrt(inF)).to(Dev));
            b = new Parameter(randn([outF, rank], generator: gen).to(Dev));
            scale = 4.0 / rank;
        }
        if (rowScale) c = new Parameter((1 + 0.3 * randn([outF], generator: gen)).to(Dev));
        if (rowScale && divided) n = (1 + rand([outF], generator: gen)).to(Dev);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var y = linear.call(x);
        if (a is not null)
        {
            var xa = nn.functional.linear(x, a.to(x.dtype));
            y = torchx.addmm(y.reshape(-1, y.size(-1)), xa.reshape(-1, xa.size(-1)), b!.to(x.dtype).t(), 1, scale).view(y.shape);
        }
        if (c is not null) y = (y.to(ScalarType.Float32) * (n is null ? c : c / n)).to(x.dtype);
        return y.MoveToOuterDisposeScope();
    }

    public LowRankParts? low_rank_parts(out string reason)
    {
        reason = "";
        var (c, n) = (this.c, this.n);
        return new LowRankParts(linear.weight!, null, a, b, scale)
        {
            RowScale = c is null || n is not null ? null : () => c,
            DividedRowScale = c is null || n is null ? null : () => ((c / n).detach(), c, n),
        };
    }

    public IEnumerable<Parameter> Trainable() => new[] { a, b, c }.OfType<Parameter>();
}

/// <summary>A named container for fixtures, so that their module names read as a model's do.</summary>
internal sealed class FixtureBlock() : nn.Module("block");
