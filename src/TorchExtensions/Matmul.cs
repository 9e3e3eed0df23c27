using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    /// <summary>
    /// torch.matmul with libtorch's errors as .NET exceptions. TorchSharp 0.107's native THSTensor_matmul has no
    /// try/catch, so a bad <c>a.matmul(b)</c> (shape, dtype or device mismatch) throws a C++ exception into .NET and
    /// aborts the process. This computes the same product through ops whose native entry points do catch: dot, mv, mm,
    /// linear (the same GEMM kernels matmul uses) and, for batched right operands, einsum with broadcasting.
    /// Use it wherever shapes come from configuration or user input.
    /// </summary>
    public static Tensor matmul(Tensor a, Tensor b)
    {
        var (da, db) = (a.dim(), b.dim());
        if (da == 0 || db == 0)
            throw new TorchException(TorchErrorKind.Generic, $"both arguments to matmul need to be at least 1D, but they are {da}D and {db}D");
        if (da == 1 && db == 1 && a.size(0) != b.size(0)) // TorchSharp checks dot's shapes itself, with a plain InvalidOperationException
            throw new TorchException(TorchErrorKind.Generic,
                $"inconsistent tensor size, expected tensor [{a.size(0)}] and src [{b.size(0)}] to have the same number of elements");
        try
        {
            if (da == 1 && db == 1) return a.dot(b);
            if (da == 2 && db == 1) return a.mv(b);
            if (da == 2 && db == 2) return a.mm(b);
            if (db == 1)
            {
                // (..., k) · (k) = linear with a one-row weight, then drop that column.
                using var w = b.unsqueeze(0);
                using var y = torch.nn.functional.linear(a, w);
                return y.squeeze(-1);
            }
            if (db == 2)
            {
                // (..., k) · (k, n) = linear(x, bᵀ): one GEMM over all leading dimensions, as matmul does.
                using var w = b.t();
                return torch.nn.functional.linear(a, w);
            }
            // b batched: (..., m, k) · (..., k, n) with broadcast batch dimensions.
            if (da == 1)
            {
                using var a2 = a.unsqueeze(0);
                using var y = einsum("...ij,...jk->...ik", a2, b);
                return y.squeeze(-2);
            }
            return einsum("...ij,...jk->...ik", a, b);
        }
        catch (System.Runtime.InteropServices.ExternalException e)
        {
            throw TorchErrors.Translate(e);
        }
    }
}
