using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// The large products of the fused blocks (frozen base weights forward and backward, the cross-entropy's head chunks)
/// through cuBLAS without a workspace (<see cref="Cublas.Gemm"/>). libtorch's handle has one, and with it cuBLAS runs
/// these shapes on tile-scheduled kernels that need a zeroed counter: a 4-byte memset before each product, about a
/// microsecond plus a launch gap after it, ~250 a llama-1b LoRA step (0.95 ms of gaps and 0.28 ms of memsets in session
/// 16's DoRA timeline). Without a workspace it picks the statically scheduled variant of the same tile, as fast alone
/// (H200, session 17 call B: gate 8192 × 2048 × 8192 357 vs 359 µs, down's dx 338 vs 337). LoRA's thin products stay on
/// libtorch's handle: their kernels use the workspace (a rank-16 update ran 3× slower without). CUDA, bf16 and fp16
/// operands of one dtype with a unit stride in either dimension; anything else, and LORAHUB_GEMM_NO_WORKSPACE=0, takes
/// libtorch's mm and addmm, whose errors name bad shapes.
/// </summary>
internal static class WorkspaceFreeGemm
{
    private static long launches;

    /// <summary>Products that ran here so far (tests: a silent fallback must not pass).</summary>
    public static long Launches => Interlocked.Read(ref launches);

    /// <summary>Whether large products skip libtorch's handle (default on; LORAHUB_GEMM_NO_WORKSPACE=0: off).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_GEMM_NO_WORKSPACE")?.Trim() != "0";

    /// <summary>a·b (a: m × k, b: k × n), as a.mm(b).</summary>
    public static Tensor Mm(Tensor a, Tensor b)
    {
        if (!Applies(a, b, null)) return a.mm(b);
        var c = empty([a.size(0), b.size(1)], a.dtype, a.device);
        if (Run(c, a, b, beta: 0)) return c;
        c.Dispose();
        return a.mm(b);
    }

    /// <summary>c ← c + a·b in place, as torchx.addmm_(c, a, b).</summary>
    public static Tensor Addmm_(Tensor c, Tensor a, Tensor b)
    {
        if (!Applies(a, b, c) || !Run(c, a, b, beta: 1)) torchx.addmm_(c, a, b);
        return c;
    }

    private static bool Applies(Tensor a, Tensor b, Tensor? c) =>
        Enabled && a.device_type == DeviceType.CUDA && a.dtype is (ScalarType.BFloat16 or ScalarType.Float16)
        && a.dim() == 2 && b.dim() == 2 && b.dtype == a.dtype && a.size(1) == b.size(0) && SameDevice(a, b)
        && (c is null || (c.dim() == 2 && c.dtype == a.dtype && c.size(0) == a.size(0) && c.size(1) == b.size(1) && SameDevice(a, c)))
        && Cublas.UnavailableReason is null;

    // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: cuBLAS's first operand is B, its second A, its m × n is n × m. A
    // row-major operand (unit column stride) is its own transpose in column-major terms (op N); a column-major one (a
    // transposed view, unit row stride) needs op T. False (nothing ran) where neither stride is 1, a size does not fit an
    // int or cuBLAS refuses.
    private static bool Run(Tensor c, Tensor a, Tensor b, float beta)
    {
        long m = a.size(0), k = a.size(1), n = b.size(1);
        if (m < 2 || k < 2 || n < 2 || m > int.MaxValue || k > int.MaxValue || n > int.MaxValue) return false;
        if (c.stride(1) != 1 || c.stride(0) < n || c.stride(0) > int.MaxValue) return false;
        if (Layout(b, n) is not var (opB, ldb) || Layout(a, k) is not var (opA, lda)) return false;
        var type = a.dtype == ScalarType.BFloat16 ? Cublas.R16BF : Cublas.R16F;
        if (!Cublas.Gemm(DeviceIndex(a), CudaDriver.LegacyStream, opB, opA, (int)n, (int)m, (int)k, 1f, Ptr(b), ldb, Ptr(a), lda, beta, Ptr(c),
                (int)c.stride(0), type))
            return false;
        Interlocked.Increment(ref launches);
        return true;
    }

    // (op, leading dimension) of an operand whose rows are `cols` long in row-major terms.
    private static (int op, int ld)? Layout(Tensor t, long cols)
    {
        if (t.stride(1) == 1 && t.stride(0) >= cols && t.stride(0) <= int.MaxValue) return (Cublas.OpN, (int)t.stride(0));
        if (t.stride(0) == 1 && t.stride(1) >= t.size(0) && t.stride(1) <= int.MaxValue) return (Cublas.OpT, (int)t.stride(1));
        return null;
    }
}
