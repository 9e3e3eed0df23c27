using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    /// <summary>
    /// beta·input + alpha·(mat1 @ mat2) with double scalars. TorchSharp's Tensor.addmm takes float beta and alpha, which
    /// rounds them for float64 tensors (for other dtypes libtorch computes in float anyway, so the fused addmm is used).
    /// </summary>
    public static Tensor addmm(Tensor input, Tensor mat1, Tensor mat2, double beta = 1, double alpha = 1)
    {
        if (FloatExact(input, beta, alpha)) return input.addmm(mat1, mat2, (float)beta, (float)alpha);
        using var scope = NewDisposeScope();
        var product = mat1.matmul(mat2);
        return (beta == 1 ? input.add(product, alpha) : input.mul(beta).add(product, alpha)).MoveToOuterDisposeScope();
    }

    /// <summary>In-place <see cref="addmm"/>: input ← beta·input + alpha·(mat1 @ mat2).</summary>
    public static Tensor addmm_(Tensor input, Tensor mat1, Tensor mat2, double beta = 1, double alpha = 1)
    {
        if (FloatExact(input, beta, alpha)) return input.addmm_(mat1, mat2, (float)beta, (float)alpha);
        using var scope = NewDisposeScope();
        var product = mat1.matmul(mat2);
        if (beta != 1) input.mul_(beta);
        input.add_(product, alpha);
        return input;
    }

    /// <summary>
    /// alpha·(mat1 @ mat2) as one GEMM with alpha in its epilogue (addmm with beta 0, whose input is never read), where
    /// `mat1.mm(mat2).mul_(alpha)` launches a second kernel over the product; the backward passes of the LoRA blocks
    /// scale every thin gradient product by s this way.
    /// </summary>
    public static Tensor mm(Tensor mat1, Tensor mat2, double alpha)
    {
        if (alpha == 1) return mat1.mm(mat2);
        using var unread = empty(Array.Empty<long>(), mat1.dtype, mat1.device);
        return addmm(unread, mat1, mat2, beta: 0, alpha: alpha);
    }

    private static bool FloatExact(Tensor input, double beta, double alpha) =>
        input.dtype != ScalarType.Float64 || ((double)(float)beta == beta && (double)(float)alpha == alpha);
}
