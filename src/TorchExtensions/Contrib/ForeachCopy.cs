using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    private static long foreachCopyLaunches;

    /// <summary>Launches of <see cref="_foreach_copy_"/>'s kernel so far (tests: a silent fallback must not pass).</summary>
    public static long ForeachCopyLaunches => Interlocked.Read(ref foreachCopyLaunches);

    /// <summary>
    /// dst[i].copy_(src[i]) for every i, casting between fp32, fp16 and bf16 as copy_ does (round to nearest even):
    /// PyTorch's torch._foreach_copy_. On CUDA, contiguous tensors of one device go up to
    /// <see cref="ForeachCopyKernel.MaxTensors"/> per kernel launch — the LoRA blocks cast their adapters' small A and B
    /// to the activations' dtype and their gradients back this way, one launch per block where each was its own kernel
    /// (each tiny, but a launch and a gap on the GPU). Elsewhere, or for other layouts, one copy_ each.
    /// </summary>
    public static void _foreach_copy_(IReadOnlyList<Tensor> dst, IReadOnlyList<Tensor> src)
    {
        if (dst.Count != src.Count) throw new ArgumentException($"_foreach_copy_: {dst.Count} destinations for {src.Count} sources");
        for (var i = 0; i < dst.Count; i++)
            if (!dst[i].shape.SequenceEqual(src[i].shape))
                throw new ArgumentException($"_foreach_copy_: tensor {i} has shape [{string.Join(", ", src[i].shape)}], its destination [{string.Join(", ", dst[i].shape)}]");
        var kernel = new List<int>();
        for (var i = 0; i < dst.Count; i++)
            if (ForeachCopyKernel.Takes(dst[i], src[i], dst[0])) kernel.Add(i);
            else dst[i].copy_(src[i]);
        for (var start = 0; start < kernel.Count; start += ForeachCopyKernel.MaxTensors)
        {
            var part = kernel.Skip(start).Take(ForeachCopyKernel.MaxTensors).ToArray();
            if (!ForeachCopyKernel.Launch(part.Select(i => dst[i]).ToArray(), part.Select(i => src[i]).ToArray()))
                foreach (var i in part) dst[i].copy_(src[i]);
            else Interlocked.Increment(ref foreachCopyLaunches);
        }
    }

    /// <summary>Each tensor in <paramref name="dtype"/> (a tensor already of it is returned as it is), by one <see cref="_foreach_copy_"/>.</summary>
    public static Tensor[] _foreach_to(IReadOnlyList<Tensor> tensors, ScalarType dtype)
    {
        var cast = new ForeachCast();
        var result = tensors.Select(t => cast.To(t, dtype)!).ToArray();
        cast.Run();
        return result;
    }
}

/// <summary>
/// Casts gathered one at a time and done together by one <see cref="torchx._foreach_copy_"/> (<see cref="Run"/>): each
/// call hands back its destination at once, so a caller keeps its own order of work — the fused LoRA functions cast their
/// adapters' A's and B's this way, and their gradients back.
/// </summary>
internal sealed class ForeachCast
{
    private readonly List<Tensor> dst = [], src = [];

    /// <summary>
    /// <paramref name="t"/> in <paramref name="dtype"/>: <paramref name="t"/> itself where it already is (unless
    /// <paramref name="copy"/>: e.g. a view that must own its memory), otherwise a new tensor that <see cref="Run"/> fills.
    /// </summary>
    public Tensor? To(Tensor? t, ScalarType dtype, bool copy = false)
    {
        if (t is null || (t.dtype == dtype && !copy)) return t;
        var d = empty(t.shape, dtype, t.device);
        dst.Add(d);
        src.Add(t);
        return d;
    }

    /// <summary>
    /// The rows of <paramref name="parts"/> (each rows × cols, one device) stacked in <paramref name="dtype"/>: by cat where
    /// none needs a cast (the part itself when there is one), otherwise one buffer whose row blocks <see cref="Run"/> fills.
    /// </summary>
    public Tensor Stack(IReadOnlyList<Tensor> parts, ScalarType dtype)
    {
        if (parts.All(p => p.dtype == dtype)) return parts.Count == 1 ? parts[0] : cat(parts.ToArray(), 0);
        var stacked = empty([parts.Sum(p => p.size(0)), parts[0].size(1)], dtype, parts[0].device);
        long row = 0;
        foreach (var p in parts)
        {
            dst.Add(stacked.narrow(0, row, p.size(0)));
            src.Add(p);
            row += p.size(0);
        }
        return stacked;
    }

    /// <summary>Fills every destination handed out so far, in one launch per 8 on CUDA.</summary>
    public void Run()
    {
        if (dst.Count > 0) torchx._foreach_copy_(dst, src);
        dst.Clear();
        src.Clear();
    }
}

/// <summary>The CUDA kernel of <see cref="torchx._foreach_copy_"/>: up to 8 tensors per launch, passed as kernel arguments (no table to upload).</summary>
internal static class ForeachCopyKernel
{
    public const int MaxTensors = 8;

    private const int Threads = 256;

    private static readonly CudaProgram program = new("foreach_copy.cu", Source, dependentLaunch: true);

    /// <summary>Whether this pair may go through the kernel: contiguous, fp32/fp16/bf16, on the CUDA device of <paramref name="first"/>.</summary>
    public static bool Takes(Tensor dst, Tensor src, Tensor first) =>
        Usable(dst) && Usable(src) && dst.is_contiguous() && src.is_contiguous() && dst.numel() > 0
        && torchx.same_device(dst, first) && torchx.same_device(src, first);

    /// <summary>One launch for the pairs (at most <see cref="MaxTensors"/>); false when the kernel does not compile.</summary>
    public static bool Launch(Tensor[] dst, Tensor[] src)
    {
        var device = DeviceIndex(dst[0]);
        if (!program.Compiles(device, "one copy_ per tensor runs instead")) return false;
        var args = new KernelArgs();
        for (var i = 0; i < MaxTensors; i++) args.Ptr(i < src.Length ? Ptr(src[i]) : IntPtr.Zero);
        for (var i = 0; i < MaxTensors; i++) args.Ptr(i < dst.Length ? Ptr(dst[i]) : IntPtr.Zero);
        for (var i = 0; i < MaxTensors; i++) args.I64(i < dst.Length ? dst[i].numel() : 0);
        // Type codes, 4 bits each: source i at bits 8i, destination i at bits 8i + 4.
        long types = 0;
        for (var i = 0; i < dst.Length; i++) types |= (long)Code(src[i].dtype) << (8 * i) | (long)Code(dst[i].dtype) << (8 * i + 4);
        args.I64(types).I32(dst.Length);
        var most = dst.Max(t => t.numel());
        var blocks = (int)Math.Clamp((most + Threads - 1) / Threads, 1, 1024);
        program.Function(device, "lh_foreach_copy").Launch(new Dim3((uint)blocks, (uint)dst.Length), Threads, 0, args);
        return true;
    }

    // grid.y: the tensor; grid.x strides over its elements. The pointers are picked by a switch (kernel parameters cannot
    // be indexed at run time without a local copy).
    private const string Source = """
        #include "lh_common.cuh"

        #define LH_PICK(T, t, p) ((t) == 0 ? (T)p##0 : (t) == 1 ? (T)p##1 : (t) == 2 ? (T)p##2 : (t) == 3 ? (T)p##3 \
                                : (t) == 4 ? (T)p##4 : (t) == 5 ? (T)p##5 : (t) == 6 ? (T)p##6 : (T)p##7)

        extern "C" __global__ void lh_foreach_copy(const void* s0, const void* s1, const void* s2, const void* s3,
                                                   const void* s4, const void* s5, const void* s6, const void* s7,
                                                   void* d0, void* d1, void* d2, void* d3, void* d4, void* d5, void* d6, void* d7,
                                                   i64 n0, i64 n1, i64 n2, i64 n3, i64 n4, i64 n5, i64 n6, i64 n7,
                                                   i64 types, int count) { lh_grid_dependency_sync();
          const int t = blockIdx.y;
          if (t >= count) return;
          const void* src = LH_PICK(const void*, t, s);
          void* dst = LH_PICK(void*, t, d);
          const i64 n = LH_PICK(i64, t, n);
          const int stype = static_cast<int>((types >> (8 * t)) & 15);
          const int dtype = static_cast<int>((types >> (8 * t + 4)) & 15);
          const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
          for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
            store_any(dst, i, dtype, load_any(src, i, stype));
        }
        """;
}
