using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.GaLore;

/// <summary>
/// Projects a 2-D gradient G (m×n) onto its top-r singular subspace: right side (G·Pᵀ, P = Vhᵣ) when m ≥ n, left
/// side (Pᵀ·G, P = Uᵣ) otherwise, so the optimizer state is m×r or r×n instead of m×n.
/// </summary>
public sealed class GaLoreProjector : IDisposable
{
    public GaLoreProjector(long rows, long cols, int rank, string projType, double scale, Device device)
    {
        Right = projType == "right" || (projType == "std" && rows >= cols);
        Rank = (int)Math.Min(rank, Right ? cols : rows);
        Scale = scale;
        Matrix = (Right ? torch.zeros([Rank, cols], ScalarType.Float32, device) : torch.zeros([rows, Rank], ScalarType.Float32, device)).DetachFromDisposeScope();
        ProjectedShape = Right ? [rows, Rank] : [Rank, cols];
    }

    public bool Right { get; }
    public int Rank { get; }
    public double Scale { get; }
    /// <summary>Vhᵣ (r×n) for the right side, Uᵣ (m×r) for the left.</summary>
    public Tensor Matrix { get; }
    public long[] ProjectedShape { get; }

    /// <summary>Recomputes the projector from the gradient's SVD (in float32).</summary>
    public void Update(Tensor gradient)
    {
        using var scope = torch.NewDisposeScope();
        var (u, _, vh) = torch.linalg.svd(gradient.to(ScalarType.Float32), fullMatrices: false);
        Matrix.copy_(Right ? vh.narrow(0, 0, Rank) : u.narrow(1, 0, Rank));
    }

    public Tensor Project(Tensor gradient) => Right ? gradient.matmul(Matrix.t()) : Matrix.t().matmul(gradient);

    public Tensor ProjectBack(Tensor low) => (Right ? low.matmul(Matrix) : Matrix.matmul(low)) * Scale;

    public void Dispose() => Matrix.Dispose();
}
