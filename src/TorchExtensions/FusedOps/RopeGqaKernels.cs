using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// Rotary-embedding kernels organised per token (so one token's cos/sin rows serve all its heads from L1) with 16-byte
/// accesses along head_dim, and the grouped-query variant that also repeats k and v to the query's head count:
/// <list type="bullet">
/// <item><c>lh_rope_heads</c>: x (B, H, T, D) of any strides with unit stride along D into y of any such strides (the
/// launcher behind <see cref="FusedKernels.Rope"/>, i.e. <c>torchx.nn.functional.rotary_embedding</c>).</item>
/// <item><c>lh_rope_gqa</c>: q, k, v in one launch (blockIdx.y picks the tensor). Forward: q rotated, k rotated and
/// stored to its groups query heads, v copied to them, all three written as (B, T, H, D) memory (what SDPA's kernels take
/// without a copy). Backward: dq rotated back; dk and dv summed over their groups in fp32 (dk then rotated back), one
/// rounding each.</item>
/// </list>
/// Rotation in fp32 from fp32 tables and one rounding to the tensor's dtype (as <c>lh_rope</c> of Kernels/fused.cu; bf16
/// a pair at a time by lh_common's lh_round_pair: the same bits but for NaN payloads).
/// Compiled apart from the other kernels: if NVRTC rejects it, only these turn off (callers keep the older rope kernel
/// and the expand-and-copy repeat). LORAHUB_ROPE_GQA_KERNEL=0 turns them off too.
/// </summary>
internal static class RopeGqaKernels
{
    private const string Source = """
#include "lh_common.cuh"

// N fp32 table entries at p (16-byte aligned when N % 4 == 0, checked by the launcher).
template <int N>
__device__ __forceinline__ void load_table(const float* __restrict__ p, float* out) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N; k += 4) {
      const Pack<float, 4> f = *reinterpret_cast<const Pack<float, 4>*>(p + k);
#pragma unroll
      for (int i = 0; i < 4; i++) out[k + i] = f.v[i];
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; k++) out[k] = p[k];
  }
}

// Blocks of tpb tokens; within one, the work items are (token, head, slice): a thread moves the N-element slice j of the
// first half of a head's row and its partner in the second half, so a warp reads whole rows of consecutive heads.
// `heads` counts the side with fewer heads; the other has heads·groups, head h·groups + g standing for head h.
// spread (forward): each input head is loaded once, rotated (rotate 1) or copied (0), and stored to its groups heads.
// gather (backward, spread 0): the groups are summed in fp32, then rotated back (rotate −1, the transpose) or copied.
// Forward: y1 = x1·c1 − x2·s1, y2 = x2·c2 + x1·s2. Transpose: dx1 = d1·c1 + d2·s2, dx2 = d2·c2 − d1·s1.
template <typename T, int N>
__device__ __forceinline__ void rope_heads(const T* __restrict__ in, T* __restrict__ out, i64 isb, i64 ist, i64 ish,
                                           i64 osb, i64 ost, i64 osh, const float* __restrict__ cos,
                                           const float* __restrict__ sin, i64 csb, i64 cst, u32 heads, u32 groups,
                                           int spread, int rotate, u32 Tn, u32 half, u32 tokens, u32 tpb) {
  const u32 hv = half / N;
  const u32 items = heads * hv;
  const u32 token0 = blockIdx.x * tpb;
  if (token0 >= tokens || items == 0) return;
  const u32 work = (tokens - token0 < tpb ? tokens - token0 : tpb) * items;
  for (u32 f = threadIdx.x; f < work; f += blockDim.x) {
    const u32 tk = f / items;
    const u32 rem = f - tk * items;
    const u32 h = rem / hv;
    const u32 j = (rem - h * hv) * N;
    const u32 token = token0 + tk;
    const i64 b = token / Tn;
    const i64 t = token - static_cast<u32>(b) * Tn;
    float x1[N], x2[N];
    if (spread) {
      const T* src = in + b * isb + t * ist + static_cast<i64>(h) * ish;
      const Pack<T, N> a = *reinterpret_cast<const Pack<T, N>*>(src + j);
      const Pack<T, N> c = *reinterpret_cast<const Pack<T, N>*>(src + half + j);
#pragma unroll
      for (int k = 0; k < N; k++) {
        x1[k] = Cvt<T>::to(a.v[k]);
        x2[k] = Cvt<T>::to(c.v[k]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < N; k++) x1[k] = x2[k] = 0.f;
      for (u32 g = 0; g < groups; g++) {
        const T* src = in + b * isb + t * ist + static_cast<i64>(h * groups + g) * ish;
        const Pack<T, N> a = *reinterpret_cast<const Pack<T, N>*>(src + j);
        const Pack<T, N> c = *reinterpret_cast<const Pack<T, N>*>(src + half + j);
#pragma unroll
        for (int k = 0; k < N; k++) {
          x1[k] += Cvt<T>::to(a.v[k]);
          x2[k] += Cvt<T>::to(c.v[k]);
        }
      }
    }
    float y1[N], y2[N];
    if (rotate != 0) {
      const float* cr = cos + b * csb + t * cst;
      const float* sr = sin + b * csb + t * cst;
      float c1[N], c2[N], s1[N], s2[N];
      load_table<N>(cr + j, c1);
      load_table<N>(cr + half + j, c2);
      load_table<N>(sr + j, s1);
      load_table<N>(sr + half + j, s2);
#pragma unroll
      for (int k = 0; k < N; k++) {
        if (rotate > 0) {
          y1[k] = x1[k] * c1[k] - x2[k] * s1[k];
          y2[k] = x2[k] * c2[k] + x1[k] * s2[k];
        } else {
          y1[k] = x1[k] * c1[k] + x2[k] * s2[k];
          y2[k] = x2[k] * c2[k] - x1[k] * s1[k];
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < N; k++) {
        y1[k] = x1[k];
        y2[k] = x2[k];
      }
    }
    const Pack<T, N> o1 = lh_round_pack<T, N>(y1), o2 = lh_round_pack<T, N>(y2);
    const u32 copies = spread ? groups : 1;
    for (u32 g = 0; g < copies; g++) {
      T* dst = out + b * osb + t * ost + static_cast<i64>(spread ? h * groups + g : h) * osh;
      *reinterpret_cast<Pack<T, N>*>(dst + j) = o1;
      *reinterpret_cast<Pack<T, N>*>(dst + half + j) = o2;
    }
  }
}

#define LH_ROPE_ENTRIES(T, S, V)                                                                                          \
  extern "C" __global__ void lh_rope_heads_##S##_##V(const T* x, T* y, i64 xsb, i64 xst, i64 xsh, i64 ysb, i64 yst,       \
                                                     i64 ysh, const float* cos, const float* sin, i64 csb, i64 cst,        \
                                                     u32 heads, u32 Tn, u32 half, u32 tokens, u32 tpb, int backward) { lh_grid_dependency_sync();     \
    rope_heads<T, LH_WIDTH_##V(T)>(x, y, xsb, xst, xsh, ysb, yst, ysh, cos, sin, csb, cst, heads, 1, 1,                    \
                                   backward ? -1 : 1, Tn, half, tokens, tpb);                                              \
  }                                                                                                                         \
  extern "C" __global__ void lh_rope_gqa_##S##_##V(const T* q, T* qo, i64 qsb, i64 qst, i64 qsh, const T* k, T* ko,       \
                                                   i64 ksb, i64 kst, i64 ksh, const T* v, T* vo, i64 vsb, i64 vst,         \
                                                   i64 vsh, const float* cos, const float* sin, i64 csb, i64 cst,          \
                                                   u32 qheads, u32 kvheads, u32 groups, u32 Tn, u32 half, u32 tokens,      \
                                                   u32 tpb, int backward, int kv_bhtd, i64 ldo) { lh_grid_dependency_sync();                          \
    /* The dense side of each tensor is (B, T, heads, D) memory: outputs in forward, input gradients in backward; */      \
    /* with kv_bhtd, k and v are written (B, heads, T, D) in forward; with ldo > 0 that side's token stride is ldo */      \
    /* (backward: q, k, v's gradients as column blocks of one (B, T, Hq + 2·Hkv, D) buffer). */                           \
    const i64 D = 2 * static_cast<i64>(half);                                                                               \
    if (blockIdx.y == 0) {                                                                                                  \
      const i64 qld = ldo > 0 ? ldo : static_cast<i64>(qheads) * D;                                                         \
      rope_heads<T, LH_WIDTH_##V(T)>(q, qo, qsb, qst, qsh, Tn * qld, qld, D, cos, sin, csb, cst, qheads, 1,                  \
                                     1, backward ? -1 : 1, Tn, half, tokens, tpb);                                         \
      return;                                                                                                               \
    }                                                                                                                       \
    const bool isk = blockIdx.y == 1;                                                                                       \
    const T* in = isk ? k : v;                                                                                              \
    if (in == nullptr) return;                                                                                              \
    const i64 dense = ldo > 0 ? ldo : backward ? static_cast<i64>(kvheads) * D : static_cast<i64>(kvheads) * groups * D;    \
    const bool bhtd = kv_bhtd && !backward;                                                                                 \
    rope_heads<T, LH_WIDTH_##V(T)>(in, isk ? ko : vo, isk ? ksb : vsb, isk ? kst : vst, isk ? ksh : vsh, Tn * dense,        \
                                   bhtd ? D : dense, bhtd ? Tn * D : D, cos, sin, csb, cst, kvheads, groups, backward ? 0 : 1, \
                                   isk ? (backward ? -1 : 1) : 0, Tn, half, tokens, tpb);                                  \
  }

#define LH_WIDTH_1(T) 1
#define LH_WIDTH_v(T) (16 / sizeof(T))

LH_ROPE_ENTRIES(float, f32, 1)
LH_ROPE_ENTRIES(float, f32, v)
LH_ROPE_ENTRIES(f16, f16, 1)
LH_ROPE_ENTRIES(f16, f16, v)
LH_ROPE_ENTRIES(bf16, bf16, 1)
LH_ROPE_ENTRIES(bf16, bf16, v)
""";

    private static readonly CudaProgram program = new("rope_gqa.cu", Source, dependentLaunch: true);

    private const int Threads = 256;

    /// <summary>
    /// Whether the q/k/v kernel writes k and v as (B, H, T, D) contiguous memory (the expand-and-copy repeat's layout)
    /// instead of (B, T, H, D) (LORAHUB_ROPE_GQA_KV_LAYOUT=bhtd): for measuring which layout SDPA's kernels read faster.
    /// </summary>
    public static bool KvHeadMajor { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_ROPE_GQA_KV_LAYOUT")?.Trim().ToLowerInvariant() == "bhtd";

    /// <summary>Whether these kernels may be used (default on; LORAHUB_ROPE_GQA_KERNEL=0: off, the older paths run).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_ROPE_GQA_KERNEL")?.Trim() != "0";

    /// <summary>
    /// Whether the backward writes dq, dk, dv as adjacent column blocks of one (B, T, Hq + 2·Hkv, D) buffer even where q,
    /// k, v were separate tensors (LORAHUB_ROPE_ADJACENT_GRADIENTS; default on, 0: three buffers then): the fused q/k/v
    /// block's dx is then one GEMM over its stacked bases (<see cref="StackedBases"/>).
    /// </summary>
    public static bool AdjacentGradients { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_ROPE_ADJACENT_GRADIENTS")?.Trim() != "0";

    private static long gqaLaunches, ropeLaunches;

    /// <summary>Launches of the single-tensor kernel so far (rotary_embedding's), forward and backward.</summary>
    public static long RopeLaunches => Interlocked.Read(ref ropeLaunches);

    /// <summary>Launches of the q/k/v kernel so far, forward and backward (tests: a silent fallback must not pass).</summary>
    public static long GqaLaunches => Interlocked.Read(ref gqaLaunches);

    /// <summary>Why the kernels are off after a failed compile (null: they compiled, or were not tried).</summary>
    public static string? CompileFailure => program.CompileFailure;

    /// <summary>
    /// True when the kernels are switched on and compile for the device of <paramref name="on"/> (a compile error turns
    /// off only these: <see cref="CudaProgram.Compiles"/>).
    /// </summary>
    public static bool Available(Tensor on) =>
        Enabled && Usable(on) && program.Compiles(DeviceIndex(on), "the older rope kernel and the copy repeat run instead");

    // Tokens per block: about 1024 work items of the widest tensor per block of 256 threads.
    private static long TokensPerBlock(long itemsPerToken) => Math.Max(1, 1024 / Math.Max(1, itemsPerToken));

    private static bool VectorOk(int v, Tensor? t) =>
        t is null || (Aligned16(Ptr(t)) && t.stride().Take((int)t.dim() - 1).All(s => s % v == 0));

    private static bool TablesVectorOk(Tensor cos, Tensor sin, long csb, long cst) =>
        Aligned16(Ptr(cos)) && Aligned16(Ptr(sin)) && csb % 4 == 0 && cst % 4 == 0;

    /// <summary>
    /// Rotary embedding of x (B, H, T, D) into y (same shape); both any strides with unit stride along D; fp32 tables
    /// (T, D) with unit stride along D. <paramref name="backward"/> applies the transpose (x = dy, y = dx).
    /// </summary>
    public static void Rope(Tensor x, Tensor y, Tensor cos, Tensor sin, bool backward)
    {
        long b = x.size(0), h = x.size(1), t = x.size(2), d = x.size(3);
        var tokens = b * t;
        if (tokens == 0 || h == 0 || d == 0) return;
        var half = d / 2;
        var v = VectorWidth(x.dtype);
        long cst = cos.stride(0);
        var vec = half % v == 0 && VectorOk(v, x) && VectorOk(v, y) && TablesVectorOk(cos, sin, 0, cst);
        var n = vec ? v : 1;
        var tpb = TokensPerBlock(h * (half / n));
        long[] xs = x.stride(), ys = y.stride();
        program.Function(DeviceIndex(x), $"lh_rope_heads_{Suffix(x.dtype)}_{(vec ? "v" : "1")}")
            .Launch((tokens + tpb - 1) / tpb, Threads, 0, new KernelArgs()
                .Ptr(Ptr(x)).Ptr(Ptr(y)).I64(xs[0]).I64(xs[2]).I64(xs[1]).I64(ys[0]).I64(ys[2]).I64(ys[1])
                .Ptr(Ptr(cos)).Ptr(Ptr(sin)).I64(0).I64(cst)
                .I32((int)h).I32((int)t).I32((int)half).I32((int)tokens).I32((int)tpb).I32(backward ? 1 : 0));
        Interlocked.Increment(ref ropeLaunches);
    }

    /// <summary>
    /// The q/k/v pass. Forward (<paramref name="backward"/> false): q (B, Hq, T, D), k and v (B, Hkv, T, D), any strides with
    /// unit stride along D, into qo, ko, vo: (B, T, Hq, D) contiguous memory (ko, vo with Hkv·groups heads). Backward: q, k,
    /// v are the gradients of those outputs (B, Hq, T, D), any such strides; qo, ko, vo the input gradients, (B, T, heads, D)
    /// contiguous memory. v/vo null: q and k only. Tables: fp32 (T, D), or (B, T, D) per row (packed positions).
    /// <paramref name="kvHeadMajor"/> (forward): ko, vo are (B, Hkv·groups, T, D) contiguous instead.
    /// <paramref name="outTokenStride"/> (&gt; 0; not with kvHeadMajor): qo, ko, vo are (B, T, heads, D) blocks with that
    /// token stride instead of dense, e.g. backward's gradients as column blocks of one (B, T, Hq + 2·Hkv, D) buffer.
    /// </summary>
    public static void Gqa(Tensor q, Tensor qo, Tensor k, Tensor ko, Tensor? v, Tensor? vo, Tensor cos, Tensor sin,
        long qheads, long kvheads, long groups, bool backward, bool kvHeadMajor = false, long outTokenStride = 0)
    {
        long b = q.size(0), t = q.size(2), d = q.size(3);
        var tokens = b * t;
        if (tokens == 0 || d == 0) return;
        var half = d / 2;
        var vw = VectorWidth(q.dtype);
        var (csb, cst) = cos.dim() == 3 ? (cos.stride(0), cos.stride(1)) : (0L, cos.stride(0));
        var vec = half % vw == 0 && new[] { q, qo, k, ko, v, vo }.All(x => VectorOk(vw, x)) && TablesVectorOk(cos, sin, csb, cst);
        var n = vec ? vw : 1;
        var tpb = TokensPerBlock(qheads * (half / n));
        long[] qs = q.stride(), ks = k.stride();
        var vs = v?.stride() ?? [0L, 0L, 0L, 0L];
        program.Function(DeviceIndex(q), $"lh_rope_gqa_{Suffix(q.dtype)}_{(vec ? "v" : "1")}")
            .Launch(new Dim3((uint)((tokens + tpb - 1) / tpb), 3), Threads, 0, new KernelArgs()
                .Ptr(Ptr(q)).Ptr(Ptr(qo)).I64(qs[0]).I64(qs[2]).I64(qs[1])
                .Ptr(Ptr(k)).Ptr(Ptr(ko)).I64(ks[0]).I64(ks[2]).I64(ks[1])
                .Ptr(v is null ? IntPtr.Zero : Ptr(v)).Ptr(vo is null ? IntPtr.Zero : Ptr(vo)).I64(vs[0]).I64(vs[2]).I64(vs[1])
                .Ptr(Ptr(cos)).Ptr(Ptr(sin)).I64(csb).I64(cst)
                .I32((int)qheads).I32((int)kvheads).I32((int)groups).I32((int)t).I32((int)half).I32((int)tokens).I32((int)tpb)
                .I32(backward ? 1 : 0).I32(kvHeadMajor && !backward ? 1 : 0).I64(outTokenStride));
        Interlocked.Increment(ref gqaLaunches);
    }
}
