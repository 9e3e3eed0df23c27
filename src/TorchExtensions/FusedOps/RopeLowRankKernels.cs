using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// Llama attention's rotary embedding and grouped-query repeat with q/k/v's LoRA B-updates and DoRA row scales applied
/// inside (<see cref="LoraQkvRopeFunction"/>), where the fused q/k/v block otherwise adds each update by an addmm and
/// scales each output by a pass of its own (3 + 3 launches per layer):
/// <list type="bullet">
/// <item>Forward (<c>lh_rope_lr_fwd</c>): per projection pre = c ⊙ (base + s·xa·Bᵀ) in fp32 (base = x·Wᵀ from the GEMM,
/// xa the stacked thin product, lh_lowrank_epilogue.cuh), then q, k rotated and k, v stored to their groups query heads as
/// (B, T, H, D) memory: one rounding.</item>
/// <item>Backward (<c>lh_rope_lr_bwd</c>): each kv head's group summed in fp32, rotated back (d pre), d inner = c ⊙ d pre
/// written into a column block of one (tokens, Nq + Nk + Nv) buffer (q, k, v side by side: one dx GEMM), and for a row
/// scale that needs its gradient the per-block column sums of d pre ⊙ inner, inner recomputed exactly from the saved base,
/// xa and B; <c>lh_rope_lr_col_reduce</c> adds them in a fixed order (no atomics: the same bits every run) and divides by
/// DoRA's n (c = m/n).</item>
/// </list>
/// A block owns <see cref="TokensPerBlock"/> tokens; a thread owns a slice of N = 2 (1 where the layout does not allow)
/// elements in each half of one head for all of them, 8 tokens at a time (4 in the backward with dc) whose loads are
/// issued together, with B's rows for its 2N columns in registers one chunk of 8 ranks at a time against those tokens'
/// xa rows (staged in shared memory). Ranks that are multiples of 8 up to 64.
/// Compiled apart from the other kernels: a compile error turns off only these (the fused q/k/v block and the rope kernel
/// then run as before). Off by default: LORAHUB_QKV_ROPE_EPILOGUE=1 turns them on.
/// </summary>
internal static class RopeLowRankKernels
{
    /// <summary>
    /// Tokens per block, 16 (default) or 32 (LORAHUB_QKV_ROPE_TOKENS; the xa tile in shared memory is sized for 32): 16
    /// gives twice the blocks and twice the rows of dc's partial sums. Session 8 call A2 (H200, llama-1b q/k/v, r16, host
    /// stopwatch, first kernel design): forward 98.5 against 122.4 µs with 32, DoRA backward 178.3 against 206.6 µs.
    /// </summary>
    public static int TokensPerBlock
    {
        get => tokensPerBlock;
        set => tokensPerBlock = value is 16 or 32 ? value : throw new ArgumentOutOfRangeException(nameof(value), value, "16 or 32");
    }

    private static int tokensPerBlock = Environment.GetEnvironmentVariable("LORAHUB_QKV_ROPE_TOKENS")?.Trim() == "32" ? 32 : 16;

    /// <summary>Largest rank taken (lh_lowrank_epilogue.cuh's LH_LR_MAX_RANK).</summary>
    public const long MaxRank = 64;

    /// <summary>
    /// Threads per block, 128 (default) or 256 (LORAHUB_QKV_ROPE_THREADS): a block's work items (head slices, each for all
    /// the block's tokens) are split over its threads, so 256 takes q's in fewer rounds but leaves threads idle where k, v
    /// have fewer items.
    /// </summary>
    public static int Threads
    {
        get => threads;
        set => threads = value is 128 or 256 ? value : throw new ArgumentOutOfRangeException(nameof(value), value, "128 or 256");
    }

    private static int threads = Environment.GetEnvironmentVariable("LORAHUB_QKV_ROPE_THREADS")?.Trim() == "256" ? 256 : 128;

    private const string Source = """
#include "lh_common.cuh"
#include "lh_lowrank_epilogue.cuh"

#define LH_RLR_TT 32   // most tokens per block (tpb: the launch's, 16 or 32)
// P: tokens a thread takes together (their loads issued at once, their dots against one chunk of B in registers): 8,
// 4 in the backward with dc (which holds d out, the base and the dots of each at once).

// N fp32 table entries at p: one load where N is 2 or 4 (the launcher checks the tables' alignment and strides).
template <int N>
__device__ __forceinline__ void table_values(const float* __restrict__ p, float (&out)[N]) {
  if constexpr (N == 2 || N == 4) {
    const Pack<float, N> f = *reinterpret_cast<const Pack<float, N>*>(p);
#pragma unroll
    for (int k = 0; k < N; k++) out[k] = f.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < N; k++) out[k] = p[k];
  }
}

// One tensor (q, k or v) of a block's tpb tokens. Work item: (head h of the side with fewer heads, slice j of N
// elements of the first half of the head's row and its partner in the second half); a thread keeps its item for all
// the block's tokens, P at a time: their loads are issued together (tokens past the last are clamped to it, so
// loads need no guard; only their stores and sums are skipped). Columns are those of the projection (h·D + j + k,
// h·D + half + j + k). The block's per-token offsets (input rows, table rows) are computed once into shared memory.
// Forward (BWD false): in = base (tokens, heads·D) by strides (b, t, h); x = c ⊙ (base + s·xa·Bᵀ) (fp32), rotated when
// rotate, stored to the groups heads h·groups + g of out (token row stride ldo, head stride D).
// Backward: in = d out (B, heads·groups, T, D) by strides (b, t, h); the groups summed (fp32), rotated back when rotate
// (d pre), c ⊙ d pre stored to out (token row stride ldo, head stride D); with partial, Σ over the block's tokens of
// d pre ⊙ inner (inner = base + s·xa·Bᵀ, base at row stride ldbase) into partial[blockIdx.x·ldp + column].
// Forward: y1 = x1·c1 − x2·s1, y2 = x2·c2 + x1·s2. Transpose: dx1 = d1·c1 + d2·s2, dx2 = d2·c2 − d1·s1.
template <typename T, int N, bool BWD, bool DOTS, int P>
__device__ __forceinline__ void rope_lowrank(const T* __restrict__ in, i64 isb, i64 ist, i64 ish, T* __restrict__ out,
                                             i64 ldo, const T* __restrict__ base, i64 ldbase, float* __restrict__ partial,
                                             i64 ldp, const T* __restrict__ xa, i64 ldx, const T* __restrict__ b, i64 ldb,
                                             int rank, float s, const float* __restrict__ c, const float* __restrict__ cos,
                                             const float* __restrict__ sin, i64 csb, i64 cst, u32 heads, u32 groups,
                                             int rotate, u32 Tn, u32 half, u32 tokens, u32 tpb, float* tile,
                                             i64* in_off, i64* tab_off) {
  const u32 token0 = blockIdx.x * tpb;
  if (token0 >= tokens || in == nullptr) return;  // the same for the whole block
  const int ntok = tokens - token0 < tpb ? static_cast<int>(tokens - token0) : static_cast<int>(tpb);
  // The low-rank dots: forward where there is an update; backward only for dc (inner). DOTS false: none compiled in.
  const bool dots = DOTS && rank > 0 && (!BWD || partial != nullptr);
  const bool dc = BWD && DOTS && partial != nullptr;
  const int pad = lowrank_padded(rank);
  if (dots) lowrank_stage_xa<T>(xa, ldx, 0, token0, static_cast<int>(tpb), tokens, rank, tile);
  for (int i = threadIdx.x; i < ntok; i += blockDim.x) {
    const u32 token = token0 + i;
    const i64 bi = token / Tn;
    const i64 t = token - static_cast<u32>(bi) * Tn;
    in_off[i] = bi * isb + t * ist;
    tab_off[i] = bi * csb + t * cst;
  }
  __syncthreads();
  const i64 D = 2 * static_cast<i64>(half);
  const u32 hv = half / N;
  const u32 items = heads * hv;
  for (u32 item = threadIdx.x; item < items; item += blockDim.x) {
    const u32 h = item / hv;
    const u32 j = (item - h * hv) * N;
    const i64 col1 = static_cast<i64>(h) * D + j, col2 = col1 + half;
    float cc1[N], cc2[N], dc1[N], dc2[N];
#pragma unroll
    for (int k = 0; k < N; k++) {
      cc1[k] = c != nullptr ? c[col1 + k] : 1.f;
      cc2[k] = c != nullptr ? c[col2 + k] : 1.f;
      dc1[k] = dc2[k] = 0.f;
    }
    for (int t0 = 0; t0 < ntok; t0 += P) {
      int tk[P];
#pragma unroll
      for (int tt = 0; tt < P; tt++) tk[tt] = t0 + tt < ntok ? t0 + tt : ntok - 1;
      // The chunk's inputs, all loads issued before any is used: forward the base; backward d out (summed over the
      // groups) and, for dc, the base.
      Pack<T, N> ba[P], bb[P];
      float x1[P][N], x2[P][N];
      if (!BWD || dc) {
#pragma unroll
        for (int tt = 0; tt < P; tt++) {
          const T* src = !BWD ? in + in_off[tk[tt]] + static_cast<i64>(h) * ish
                              : base + static_cast<i64>(token0 + tk[tt]) * ldbase + static_cast<i64>(h) * D;
          ba[tt] = *reinterpret_cast<const Pack<T, N>*>(src + j);
          bb[tt] = *reinterpret_cast<const Pack<T, N>*>(src + half + j);
        }
      }
      if (BWD) {
#pragma unroll
        for (int tt = 0; tt < P; tt++) {
#pragma unroll
          for (int k = 0; k < N; k++) x1[tt][k] = x2[tt][k] = 0.f;
        }
        for (u32 g = 0; g < groups; g++) {
          Pack<T, N> ga[P], gb[P];
#pragma unroll
          for (int tt = 0; tt < P; tt++) {
            const T* src = in + in_off[tk[tt]] + static_cast<i64>(h * groups + g) * ish;
            ga[tt] = *reinterpret_cast<const Pack<T, N>*>(src + j);
            gb[tt] = *reinterpret_cast<const Pack<T, N>*>(src + half + j);
          }
#pragma unroll
          for (int tt = 0; tt < P; tt++) {
#pragma unroll
            for (int k = 0; k < N; k++) {
              x1[tt][k] += Cvt<T>::to(ga[tt].v[k]);
              x2[tt][k] += Cvt<T>::to(gb[tt].v[k]);
            }
          }
        }
      }
      float acc1[P][N], acc2[P][N];
#pragma unroll
      for (int tt = 0; tt < P; tt++) {
#pragma unroll
        for (int k = 0; k < N; k++) acc1[tt][k] = acc2[tt][k] = 0.f;
      }
      if (dots) {
        for (int k0 = 0; k0 < rank; k0 += LH_LR_CHUNK) {
          float b1[N][LH_LR_CHUNK], b2[N][LH_LR_CHUNK];
#pragma unroll
          for (int k = 0; k < N; k++) {
            lowrank_b_chunk_aligned<T>(b, ldb, col1 + k, k0, b1[k]);
            lowrank_b_chunk_aligned<T>(b, ldb, col2 + k, k0, b2[k]);
          }
#pragma unroll
          for (int tt = 0; tt < P; tt++) {
            // The token's xa ranks k0 .. k0 + 7 as two 16-byte shared loads (rows of pad floats, pad a multiple of 8).
            const Pack<float, 4> xl = *reinterpret_cast<const Pack<float, 4>*>(tile + (t0 + tt) * pad + k0);
            const Pack<float, 4> xh = *reinterpret_cast<const Pack<float, 4>*>(tile + (t0 + tt) * pad + k0 + 4);
            const float xr[LH_LR_CHUNK] = {xl.v[0], xl.v[1], xl.v[2], xl.v[3], xh.v[0], xh.v[1], xh.v[2], xh.v[3]};
#pragma unroll
            for (int k = 0; k < N; k++) {
              acc1[tt][k] = lowrank_dot_chunk(xr, b1[k], acc1[tt][k]);
              acc2[tt][k] = lowrank_dot_chunk(xr, b2[k], acc2[tt][k]);
            }
          }
        }
      }
#pragma unroll
      for (int tt = 0; tt < P; tt++) {
        const bool live = t0 + tt < ntok;
        const u32 token = token0 + tk[tt];
        if (!BWD) {
#pragma unroll
          for (int k = 0; k < N; k++) {
            x1[tt][k] = lowrank_epilogue(Cvt<T>::to(ba[tt].v[k]), acc1[tt][k], s, cc1[k]);
            x2[tt][k] = lowrank_epilogue(Cvt<T>::to(bb[tt].v[k]), acc2[tt][k], s, cc2[k]);
          }
        }
        float y1[N], y2[N];
        if (rotate) {
          float c1[N], c2[N], s1[N], s2[N];
          const i64 to = tab_off[tk[tt]];
          table_values<N>(cos + to + j, c1);
          table_values<N>(cos + to + half + j, c2);
          table_values<N>(sin + to + j, s1);
          table_values<N>(sin + to + half + j, s2);
#pragma unroll
          for (int k = 0; k < N; k++) {
            if (!BWD) {
              y1[k] = x1[tt][k] * c1[k] - x2[tt][k] * s1[k];
              y2[k] = x2[tt][k] * c2[k] + x1[tt][k] * s2[k];
            } else {
              y1[k] = x1[tt][k] * c1[k] + x2[tt][k] * s2[k];
              y2[k] = x2[tt][k] * c2[k] - x1[tt][k] * s1[k];
            }
          }
        } else {
#pragma unroll
          for (int k = 0; k < N; k++) {
            y1[k] = x1[tt][k];
            y2[k] = x2[tt][k];
          }
        }
        Pack<T, N> o1, o2;
        if (!BWD) {
#pragma unroll
          for (int k = 0; k < N; k++) {
            o1.v[k] = Cvt<T>::from(y1[k]);
            o2.v[k] = Cvt<T>::from(y2[k]);
          }
          if (live) {
            for (u32 g = 0; g < groups; g++) {
              T* dst = out + static_cast<i64>(token) * ldo + static_cast<i64>(h * groups + g) * D;
              *reinterpret_cast<Pack<T, N>*>(dst + j) = o1;
              *reinterpret_cast<Pack<T, N>*>(dst + half + j) = o2;
            }
          }
        } else {
          // y = d pre: d inner = c ⊙ d pre; dc += d pre ⊙ inner.
#pragma unroll
          for (int k = 0; k < N; k++) {
            o1.v[k] = Cvt<T>::from(cc1[k] * y1[k]);
            o2.v[k] = Cvt<T>::from(cc2[k] * y2[k]);
          }
          if (live) {
            T* dst = out + static_cast<i64>(token) * ldo + static_cast<i64>(h) * D;
            *reinterpret_cast<Pack<T, N>*>(dst + j) = o1;
            *reinterpret_cast<Pack<T, N>*>(dst + half + j) = o2;
            if (dc) {
#pragma unroll
              for (int k = 0; k < N; k++) {
                dc1[k] = fmaf(y1[k], lowrank_inner(Cvt<T>::to(ba[tt].v[k]), acc1[tt][k], s), dc1[k]);
                dc2[k] = fmaf(y2[k], lowrank_inner(Cvt<T>::to(bb[tt].v[k]), acc2[tt][k], s), dc2[k]);
              }
            }
          }
        }
      }
    }
    if (dc) {
      float* row = partial + static_cast<i64>(blockIdx.x) * ldp;
#pragma unroll
      for (int k = 0; k < N; k++) {
        row[col1 + k] = dc1[k];
        row[col2 + k] = dc2[k];
      }
    }
  }
}

// One projection's parameters (z = 0, 1, 2: q, k, v).
#define LH_RLR_PARAMS(T, z)                                                                                            \
  const T *in##z, i64 isb##z, i64 ist##z, i64 ish##z, T *out##z, i64 ldo##z, const T *base##z, i64 ldbase##z,          \
      float *partial##z, i64 xcol##z, const T *b##z, i64 ldb##z, int rank##z, float s##z, const float *c##z,         \
      u32 heads##z, u32 groups##z
#define LH_RLR_CALL(T, N, BWD, DOTS, z, ROT)                                                                           \
  rope_lowrank<T, N, BWD, DOTS, (BWD && DOTS ? 4 : 8)>(in##z, isb##z, ist##z, ish##z, out##z, ldo##z, base##z, ldbase##z, partial##z, ldp,          \
                          xa + xcol##z, ldx, b##z, ldb##z, rank##z, s##z, c##z, cos, sin, csb, cst, heads##z, groups##z, \
                          ROT, Tn, half, tokens, tpb, tile, in_off, tab_off)

// blockIdx.y: the projection (0 q and 1 k rotated, 2 v copied).
#define LH_RLR_ENTRY(T, S, V, DIR, BWD, DOTS)                                                                          \
  extern "C" __global__ void __launch_bounds__(256) lh_rope_lr_##DIR##_##S##_##V(                                     \
      LH_RLR_PARAMS(T, 0), LH_RLR_PARAMS(T, 1), LH_RLR_PARAMS(T, 2), const T* xa, i64 ldx, i64 ldp, const float* cos,  \
      const float* sin, i64 csb, i64 cst, u32 Tn, u32 half, u32 tokens, u32 tpb) { lh_grid_dependency_sync();                                     \
    __shared__ __align__(16) float tile[LH_RLR_TT * LH_LR_MAX_RANK]; /* rows read as 16-byte packs */                  \
    __shared__ i64 in_off[LH_RLR_TT], tab_off[LH_RLR_TT];                                                              \
    if (blockIdx.y == 0) {                                                                                             \
      LH_RLR_CALL(T, LH_WIDTH_##V(T), BWD, DOTS, 0, 1);                                                                \
    } else if (blockIdx.y == 1) {                                                                                      \
      LH_RLR_CALL(T, LH_WIDTH_##V(T), BWD, DOTS, 1, 1);                                                                \
    } else {                                                                                                           \
      LH_RLR_CALL(T, LH_WIDTH_##V(T), BWD, DOTS, 2, 0);                                                                \
    }                                                                                                                  \
  }

// Widths: 1 or v = 2 elements.
#define LH_WIDTH_1(T) 1
#define LH_WIDTH_v(T) 2

#define LH_RLR_ALL(T, S)                        \
  LH_RLR_ENTRY(T, S, 1, fwd, false, true)       \
  LH_RLR_ENTRY(T, S, v, fwd, false, true)       \
  LH_RLR_ENTRY(T, S, 1, bwd, true, true)        \
  LH_RLR_ENTRY(T, S, v, bwd, true, true)        \
  LH_RLR_ENTRY(T, S, 1, bwdr, true, false)      \
  LH_RLR_ENTRY(T, S, v, bwdr, true, false)

// Instantiated per program (one per dtype, so NVRTC compiles only the one in use): LH_RLR_ALL(T, S) is appended.

// dc of the projections with a row scale: Σ_b partial[b, j] over the (blocks × cols) table in a fixed order (blocks of
// 32 × 8 threads, lh_common's column_sum), divided by n (then, DoRA's c = m/n: m's gradient) where given; column j of
// projection z (columns [o_z, o_z + n_z)) goes to out_z[j − o_z] (out_z null: no gradient wanted).
extern "C" __global__ void lh_rope_lr_col_reduce(const float* __restrict__ partial, int blocks, i64 cols, i64 n0, i64 n1,
                                                 float* out0, float* out1, float* out2, const float* then0,
                                                 const float* then1, const float* then2) { lh_grid_dependency_sync();
  const float total = column_sum(partial, blocks, cols);
  const i64 j = static_cast<i64>(blockIdx.x) * 32 + threadIdx.x;
  if (threadIdx.y != 0 || j >= cols) return;
  const int z = j < n0 ? 0 : j < n0 + n1 ? 1 : 2;
  const i64 i = z == 0 ? j : z == 1 ? j - n0 : j - n0 - n1;
  float* out = z == 0 ? out0 : z == 1 ? out1 : out2;
  const float* then = z == 0 ? then0 : z == 1 ? then1 : then2;
  if (out != nullptr) out[i] = then != nullptr ? total / then[i] : total;
}
""";

    // One program per dtype: NVRTC compiles only the one in use.
    private static CudaProgram bf16Program = new("rope_lowrank_bf16.cu", Source + "LH_RLR_ALL(bf16, bf16)\n", dependentLaunch: true),
        f16Program = new("rope_lowrank_f16.cu", Source + "LH_RLR_ALL(f16, f16)\n", dependentLaunch: true),
        f32Program = new("rope_lowrank_f32.cu", Source + "LH_RLR_ALL(float, f32)\n", dependentLaunch: true);

    private static CudaProgram Program(ScalarType dtype) =>
        dtype == ScalarType.BFloat16 ? bf16Program : dtype == ScalarType.Float16 ? f16Program : f32Program;

    // Compiled apart (sm_80+ mma): a failure turns off only the tensor-core forward.
    private static readonly CudaProgram mmaProgram = new("rope_lowrank_mma.cu", MmaSource, dependentLaunch: true);

    private const int MmaColumns = 256;

    /// <summary>
    /// Whether the forward and DoRA's backward form the low-rank products on tensor cores (lh_rope_lr_mma_fwd/_bwd: per
    /// block 16 tokens × 256 columns, xa·Bᵀ by mma.m16n8k16 into shared memory, then the rope pass) where they apply
    /// (bf16/fp16, ranks multiples of 16, head_dim dividing 256, sm_80+). Default off (LORAHUB_QKV_ROPE_MMA=1: on): session
    /// 8's final call timed them no faster than the fp32 dots of lh_rope_lr_fwd/_bwd at llama-1b's q/k/v (host stopwatch,
    /// H200, r16: forward 83.8 against 81.9 µs, DoRA backward 134.3 against 119.0), which is where they run otherwise.
    /// </summary>
    public static bool Mma { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_QKV_ROPE_MMA")?.Trim() == "1";

    private static long mmaLaunches;

    /// <summary>Why the tensor-core forward is off after a failed compile (null: it compiled, or was not tried).</summary>
    public static string? MmaCompileFailure => mmaProgram.CompileFailure;

    /// <summary>Launches of the tensor-core kernels so far (forward, and DoRA's backward).</summary>
    public static long MmaLaunches => Interlocked.Read(ref mmaLaunches);

    /// <summary>Compiles <paramref name="source"/> in these kernels' place until disposed (tests: a program that does not compile).</summary>
    internal static IDisposable UseSource(string source)
    {
        var before = (bf16Program, f16Program, f32Program);
        bf16Program = f16Program = f32Program = new CudaProgram("rope_lowrank_test.cu", source);
        return new Restore(() => (bf16Program, f16Program, f32Program) = before);
    }

    private sealed class Restore(Action undo) : IDisposable
    {
        public void Dispose() => undo();
    }

    private static long launches;

    /// <summary>
    /// Whether the fused q/k/v block applies its updates and row scales inside the rope kernel (default off:
    /// LORAHUB_QKV_ROPE_EPILOGUE=1 turns it on; off, the addmm and row-scale passes then the rope kernel, as before).
    /// Session 8's final call (H200, llama-1b LoRA r16 4×2048) measured no gain: 88,302 tok/s on against 88,389 off.
    /// Settable at run time.
    /// </summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_QKV_ROPE_EPILOGUE")?.Trim() == "1";

    /// <summary>
    /// Whether blocks with row scales (DoRA) take these kernels too (default off: session 8 call A measured no DoRA gain
    /// with the fp32-dot kernels, 82,137 against 82,373 tok/s; LORAHUB_QKV_ROPE_EPILOGUE_DORA=1: on). Off, DoRA's q/k/v
    /// keep the fused block's row-scale passes and the plain rope kernel.
    /// </summary>
    public static bool RowScales { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_QKV_ROPE_EPILOGUE_DORA")?.Trim() == "1";

    /// <summary>Launches so far, forward and backward (tests: a silent fallback must not pass).</summary>
    public static long Launches => Interlocked.Read(ref launches);

    /// <summary>Why the kernels are off after a failed compile (null: they compiled, or were not tried).</summary>
    public static string? CompileFailure => bf16Program.CompileFailure ?? f16Program.CompileFailure ?? f32Program.CompileFailure;

    /// <summary>One line for logs and benchmarks: launches so far, or why the kernels are off.</summary>
    public static string Report =>
        !Enabled ? "off (LORAHUB_QKV_ROPE_EPILOGUE not 1)"
        : CompileFailure is { } why ? $"off (did not compile: {why})"
        : $"{Launches} launches ({MmaLaunches} on tensor cores{(MmaCompileFailure is null ? "" : "; those did not compile")})";

    /// <summary>True when the kernels are switched on and compile for the device of <paramref name="on"/> (CUDA fp32/fp16/bf16).</summary>
    public static bool Available(Tensor on) =>
        Enabled && Usable(on) && Program(on.dtype).Compiles(DeviceIndex(on), "the fused q/k/v block and the rope kernel run as before");

    /// <summary>
    /// A B the kernels read: (n × r) of the activations' dtype on their device, r a multiple of 8 up to <see cref="MaxRank"/>,
    /// unit column stride, a row stride that is a multiple of 8 and a 32-byte aligned start (chunks of 8 ranks as one load).
    /// </summary>
    public static bool BFits(Tensor b, long n, ScalarType dtype) =>
        b.dim() == 2 && b.size(0) == n && b.size(1) > 0 && b.size(1) <= MaxRank && b.size(1) % 8 == 0 && b.dtype == dtype
        && b.stride(1) == 1 && b.stride(0) % 8 == 0 && ((long)Ptr(b) & 31) == 0;

    /// <summary>
    /// One projection's part of a launch. Forward: <see cref="In"/> its base (tokens, heads·D, unit column stride; read by
    /// its row stride), <see cref="Out"/> (tokens, heads·groups·D) contiguous. Backward: <see cref="In"/> the gradient of the
    /// forward's output as (B, heads·groups, T, D) with unit stride along D, <see cref="Out"/> d inner (tokens, heads·D, unit
    /// column stride: a column block of the stacked buffer), <see cref="Base"/> the saved base where c's gradient is wanted
    /// (else null). B null or rank 0: no update; <see cref="C"/> (fp32, contiguous) null: no row scale.
    /// </summary>
    public sealed record Part(Tensor In, Tensor Out, Tensor? Base, Tensor? B, long XaColumn, double Scale, Tensor? C, long Heads, long Groups);

    /// <summary>
    /// The forward pass for q, k, v (<paramref name="parts"/>, 3) with the stacked thin product <paramref name="xa"/>
    /// (tokens × Σr, unit column stride; null: no update at all), fp32 tables (T, D) or (B, T, D) with unit stride along D.
    /// </summary>
    public static void Forward(IReadOnlyList<Part> parts, Tensor? xa, Tensor cos, Tensor sin, long seq)
    {
        if (Mma && MmaFits(parts, xa, cos, sin)) LaunchMma(parts, xa, cos, sin, seq);
        else Launch(false, parts, xa, cos, sin, seq, null);
    }

    private static bool Aligned(Tensor? t, int bytes) => t is null || ((long)Ptr(t) & (bytes - 1)) == 0;

    // The tensor-core forward's conditions: 16-bit types, 16-byte rows (bases, outputs, tables, c), 4-byte B and xa
    // pairs, ranks multiples of 16, head_dim dividing the block's 256 columns, sm_80+, the program compiled.
    private static bool MmaFits(IReadOnlyList<Part> parts, Tensor? xa, Tensor cos, Tensor sin)
    {
        var first = parts[0];
        var dtype = first.Out.dtype;
        if (dtype is not (ScalarType.BFloat16 or ScalarType.Float16)) return false;
        var d = first.Out.size(1) / (first.Heads * first.Groups);
        var (csb, cst) = cos.dim() == 3 ? (cos.stride(0), cos.stride(1)) : (0L, cos.stride(0));
        if (MmaColumns % d != 0 || d / 2 % 8 != 0 || !Aligned(cos, 16) || !Aligned(sin, 16) || csb % 4 != 0 || cst % 4 != 0) return false;
        if (xa is not null && (xa.stride(1) != 1 || xa.stride(0) % 2 != 0 || !Aligned(xa, 4))) return false;
        foreach (var p in parts)
        {
            if (p.In.stride(1) != 1 || p.In.stride(0) % 8 != 0 || !Aligned(p.In, 16) || p.Out.stride(0) % 8 != 0 || !Aligned(p.Out, 16)) return false;
            if (p.C is not null && !Aligned(p.C, 16)) return false;
            if (p.B is { } b && (b.size(1) % 16 != 0 || b.stride(1) != 1 || b.stride(0) % 2 != 0 || !Aligned(b, 4) || p.XaColumn % 2 != 0)) return false;
        }
        var device = DeviceIndex(first.Out);
        return CudaKernels.ComputeCapability(device) >= 80 && mmaProgram.Compiles(device, "the q/k/v rope epilogue takes its fp32 dots instead");
    }

    // The tensor-core DoRA backward's conditions: 16-bit types, pairs of elements (4-byte loads) in d out, d inner, the
    // bases, B, xa and 8-byte table pairs, ranks multiples of 16, head_dim dividing 256, sm_80+, the program compiled.
    private static bool MmaBackwardFits(IReadOnlyList<Part> parts, Tensor? xa, Tensor cos, Tensor sin)
    {
        var first = parts[0];
        var dtype = first.Out.dtype;
        if (dtype is not (ScalarType.BFloat16 or ScalarType.Float16)) return false;
        var d = first.Out.size(1) / first.Heads;
        var (csb, cst) = cos.dim() == 3 ? (cos.stride(0), cos.stride(1)) : (0L, cos.stride(0));
        if (MmaColumns % d != 0 || d / 2 % 2 != 0 || !Aligned(cos, 8) || !Aligned(sin, 8) || csb % 2 != 0 || cst % 2 != 0) return false;
        if (xa is not null && (xa.stride(1) != 1 || xa.stride(0) % 2 != 0 || !Aligned(xa, 4))) return false;
        foreach (var p in parts)
        {
            if (!PackOk(p.In, 2) || !PackOk(p.Out, 2) || !PackOk(p.Base, 2)) return false;
            if (p.B is { } b && (b.size(1) % 16 != 0 || b.stride(1) != 1 || b.stride(0) % 2 != 0 || !Aligned(b, 4) || p.XaColumn % 2 != 0)) return false;
        }
        var device = DeviceIndex(first.Out);
        return CudaKernels.ComputeCapability(device) >= 80 && mmaProgram.Compiles(device, "the q/k/v rope epilogue takes its fp32 dots instead");
    }

    private static void LaunchMmaBackward(IReadOnlyList<Part> parts, Tensor? xa, Tensor cos, Tensor sin, long seq, Tensor partial)
    {
        var first = parts[0];
        var tokens = first.Out.size(0);
        if (tokens == 0) return;
        var d = first.Out.size(1) / first.Heads;
        var (csb, cst) = cos.dim() == 3 ? (cos.stride(0), cos.stride(1)) : (0L, cos.stride(0));
        var args = new KernelArgs();
        var columnGroups = new long[3];
        long offset = 0;
        for (var i = 0; i < 3; i++)
        {
            var p = parts[i];
            var width = p.Out.size(1);
            columnGroups[i] = (width + MmaColumns - 1) / MmaColumns;
            args.Ptr(Ptr(p.In)).I64(p.In.stride(0)).I64(p.In.stride(2)).I64(p.In.stride(1)).Ptr(Ptr(p.Out)).I64(p.Out.stride(0))
                .Ptr(p.Base is null ? IntPtr.Zero : Ptr(p.Base)).I64(p.Base?.stride(0) ?? 0)
                .Ptr(p.Base is not null ? Ptr(partial) + (nint)(offset * 4) : IntPtr.Zero)
                .Ptr(p.B is null ? IntPtr.Zero : Ptr(p.B)).I64(p.B?.stride(0) ?? 0).I64(p.XaColumn).I32((int)(p.B?.size(1) ?? 0))
                .F32((float)p.Scale).Ptr(p.C is null ? IntPtr.Zero : Ptr(p.C)).I32((int)p.Groups).I32((int)width);
            offset += width;
        }
        args.Ptr(xa is null ? IntPtr.Zero : Ptr(xa)).I64(xa?.stride(0) ?? 0).I64(partial.size(1)).I32((int)columnGroups[0]).I32((int)columnGroups[1])
            .Ptr(Ptr(cos)).Ptr(Ptr(sin)).I64(csb).I64(cst).I32((int)seq).I32((int)(d / 2)).I32((int)tokens);
        mmaProgram.Function(DeviceIndex(first.Out), $"lh_rope_lr_mma_bwd_{Suffix(first.Out.dtype)}")
            .Launch(new Dim3((uint)((tokens + 15) / 16), (uint)columnGroups.Sum()), 64, 0, args);
        Interlocked.Increment(ref launches);
        Interlocked.Increment(ref mmaLaunches);
    }

    private static void LaunchMma(IReadOnlyList<Part> parts, Tensor? xa, Tensor cos, Tensor sin, long seq)
    {
        var first = parts[0];
        var tokens = first.Out.size(0);
        if (tokens == 0) return;
        var d = first.Out.size(1) / (first.Heads * first.Groups);
        var (csb, cst) = cos.dim() == 3 ? (cos.stride(0), cos.stride(1)) : (0L, cos.stride(0));
        var args = new KernelArgs();
        var columnGroups = new long[3];
        for (var i = 0; i < 3; i++)
        {
            var p = parts[i];
            var width = p.Heads * d;
            columnGroups[i] = (width + MmaColumns - 1) / MmaColumns;
            args.Ptr(Ptr(p.In)).I64(p.In.stride(0)).Ptr(Ptr(p.Out)).I64(p.Out.stride(0))
                .Ptr(p.B is null ? IntPtr.Zero : Ptr(p.B)).I64(p.B?.stride(0) ?? 0).I64(p.XaColumn).I32((int)(p.B?.size(1) ?? 0))
                .F32((float)p.Scale).Ptr(p.C is null ? IntPtr.Zero : Ptr(p.C)).I32((int)p.Groups).I32((int)width);
        }
        args.Ptr(xa is null ? IntPtr.Zero : Ptr(xa)).I64(xa?.stride(0) ?? 0).I32((int)columnGroups[0]).I32((int)columnGroups[1])
            .Ptr(Ptr(cos)).Ptr(Ptr(sin)).I64(csb).I64(cst).I32((int)seq).I32((int)(d / 2)).I32((int)tokens);
        mmaProgram.Function(DeviceIndex(first.Out), $"lh_rope_lr_mma_fwd_{Suffix(first.Out.dtype)}")
            .Launch(new Dim3((uint)((tokens + 15) / 16), (uint)columnGroups.Sum()), 128, 0, args);
        Interlocked.Increment(ref launches);
        Interlocked.Increment(ref mmaLaunches);
    }

    /// <summary>
    /// The backward pass: d inner into each part's <see cref="Part.Out"/>; for parts with a <see cref="Part.Base"/>, c's
    /// gradient Σ_tokens d pre ⊙ inner (fp32, divided by the part's entry of <paramref name="divisors"/> where given) returned
    /// at its index (null elsewhere).
    /// </summary>
    public static Tensor?[] Backward(IReadOnlyList<Part> parts, Tensor? xa, Tensor cos, Tensor sin, long seq, Tensor?[] divisors)
    {
        var dc = new Tensor?[parts.Count];
        if (!parts.Any(p => p.Base is not null))
        {
            Launch(true, parts, xa, cos, sin, seq, null);
            return dc;
        }
        var tokens = parts[0].Out.size(0);
        var mma = Mma && MmaBackwardFits(parts, xa, cos, sin);
        var tpb = mma ? 16 : TokensPerBlock;
        var blocks = (tokens + tpb - 1) / tpb;
        var widths = parts.Select(p => p.Out.size(1)).ToArray();
        var cols = widths.Sum();
        using var partial = empty([blocks, cols], ScalarType.Float32, parts[0].Out.device);
        if (mma) LaunchMmaBackward(parts, xa, cos, sin, seq, partial);
        else Launch(true, parts, xa, cos, sin, seq, partial);
        for (var i = 0; i < parts.Count; i++)
            if (parts[i].Base is not null) dc[i] = empty([widths[i]], ScalarType.Float32, partial.device);
        var args = new KernelArgs().Ptr(Ptr(partial)).I32((int)blocks).I64(cols).I64(widths[0]).I64(widths[1]);
        for (var i = 0; i < 3; i++) args.Ptr(dc[i] is { } d ? Ptr(d) : IntPtr.Zero);
        for (var i = 0; i < 3; i++) args.Ptr(dc[i] is not null && divisors[i] is { } n ? Ptr(n) : IntPtr.Zero);
        Program(parts[0].Out.dtype).Function(DeviceIndex(partial), "lh_rope_lr_col_reduce").Launch((int)((cols + 31) / 32), new Dim3(32, 8), 0, args);
        return dc;
    }

    // Whether a tensor allows packs of n elements: start aligned to n elements, every stride but the last a multiple of n.
    private static bool PackOk(Tensor? t, int n) =>
        t is null || (((long)Ptr(t) & (n * t.ElementSize - 1)) == 0 && t.stride().Take((int)t.dim() - 1).All(s => s % n == 0));

    private static void Launch(bool backward, IReadOnlyList<Part> parts, Tensor? xa, Tensor cos, Tensor sin, long seq, Tensor? partial)
    {
        var first = parts[0];
        var tokens = first.Out.size(0);
        if (tokens == 0) return;
        var dtype = first.Out.dtype;
        // head_dim: the output's width over its heads (forward: heads·groups, backward: heads).
        var d = first.Out.size(1) / (backward ? first.Heads : first.Heads * first.Groups);
        var half = d / 2;
        var (csb, cst) = cos.dim() == 3 ? (cos.stride(0), cos.stride(1)) : (0L, cos.stride(0));
        // Pairs of elements (v) where the layout allows: tensors and tables (8-byte table loads) alike. Backward without dc:
        // the kernels without the dots (bwdr).
        var ropeOnly = backward && partial is null;
        var vec = half % 2 == 0 && parts.All(p => PackOk(p.In, 2) && PackOk(p.Out, 2) && PackOk(p.Base, 2))
            && ((long)Ptr(cos) & 7) == 0 && ((long)Ptr(sin) & 7) == 0 && csb % 2 == 0 && cst % 2 == 0;
        var args = new KernelArgs();
        long offset = 0;
        for (var i = 0; i < 3; i++)
        {
            var p = parts[i];
            long isb, ist, ish;
            if (backward) (isb, ist, ish) = (p.In.stride(0), p.In.stride(2), p.In.stride(1));
            else (isb, ist, ish) = (seq * p.In.stride(0), p.In.stride(0), d);
            var rank = p.B?.size(1) ?? 0;
            args.Ptr(Ptr(p.In)).I64(isb).I64(ist).I64(ish).Ptr(Ptr(p.Out)).I64(p.Out.stride(0))
                .Ptr(p.Base is null ? IntPtr.Zero : Ptr(p.Base)).I64(p.Base?.stride(0) ?? 0)
                .Ptr(partial is not null && p.Base is not null ? Ptr(partial) + (nint)(offset * 4) : IntPtr.Zero)
                .I64(p.XaColumn).Ptr(p.B is null ? IntPtr.Zero : Ptr(p.B)).I64(p.B?.stride(0) ?? 0).I32((int)rank).F32((float)p.Scale)
                .Ptr(p.C is null ? IntPtr.Zero : Ptr(p.C)).I32((int)p.Heads).I32((int)p.Groups);
            offset += p.Out.size(1);
        }
        args.Ptr(xa is null ? IntPtr.Zero : Ptr(xa)).I64(xa?.stride(0) ?? 0).I64(partial?.size(1) ?? 0)
            .Ptr(Ptr(cos)).Ptr(Ptr(sin)).I64(csb).I64(cst).I32((int)seq).I32((int)half).I32((int)tokens).I32(TokensPerBlock);
        var blocks = (tokens + TokensPerBlock - 1) / TokensPerBlock;
        var kernel = $"lh_rope_lr_{(ropeOnly ? "bwdr" : backward ? "bwd" : "fwd")}_{Suffix(dtype)}_{(vec ? "v" : "1")}";
        Program(dtype).Function(DeviceIndex(first.Out), kernel)
            .Launch(new Dim3((uint)blocks, 3), Threads, 0, args);
        Interlocked.Increment(ref launches);
    }

    private const string MmaSource = """
#include "lh_common.cuh"
#include "lh_lowrank_epilogue.cuh"

// The forward on tensor cores (bf16/fp16, ranks multiples of 16; RopeLowRankKernels.Mma).
// A block: 16 tokens × up to LH_RLR_MMA_COLS columns of one projection (blockIdx.y: q's column groups, then k's, then
// v's). Phase 1: the 16 × cols low-rank product xa·Bᵀ by mma.m16n8k16 (fp32 accumulate; warp w takes n-tiles w, w + 4,
// …) into shared memory. Phase 2: the rope pass over (token, head slice) items of 16 bytes as lh_rope_gqa's forward,
// x = c ⊙ (base + s·lr) in fp32, rotated (q, k) or copied (v), stored to the groups heads.
#include "lh_mma.cuh"

#define LH_RLR_MMA_COLS 256

template <typename T>
__device__ __forceinline__ u32 lh_pair(const T* p) { return *reinterpret_cast<const u32*>(p); }

template <typename T>
__device__ __forceinline__ void rope_lowrank_mma_fwd(const T* __restrict__ in, i64 ldi, T* __restrict__ out, i64 ldo,
                                                     const T* __restrict__ xa, i64 ldx, const T* __restrict__ b, i64 ldb,
                                                     int rank, float s, const float* __restrict__ c,
                                                     const float* __restrict__ cos, const float* __restrict__ sin,
                                                     i64 csb, i64 cst, u32 groups, int rotate, u32 Tn, u32 half,
                                                     u32 tokens, u32 col0, u32 ncols, float* lr) {
  constexpr int NV = 16 / sizeof(T);
  const u32 token0 = blockIdx.x * 16;
  if (token0 >= tokens) return;  // the same for the whole block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  if (rank > 0) {
    const i64 r0 = token0 + gid, r1 = r0 + 8;
    const bool ok0 = r0 < tokens, ok1 = r1 < tokens;
    for (u32 nt = warp; nt < ncols / 8; nt += warps) {
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      const T* brow = b + static_cast<i64>(col0 + nt * 8 + gid) * ldb;
      for (int k0 = 0; k0 < rank; k0 += 16) {
        u32 a[4];
        a[0] = ok0 ? lh_pair(xa + r0 * ldx + k0 + 2 * tig) : 0u;
        a[1] = ok1 ? lh_pair(xa + r1 * ldx + k0 + 2 * tig) : 0u;
        a[2] = ok0 ? lh_pair(xa + r0 * ldx + k0 + 8 + 2 * tig) : 0u;
        a[3] = ok1 ? lh_pair(xa + r1 * ldx + k0 + 8 + 2 * tig) : 0u;
        Mma<T>::run(d, a, lh_pair(brow + k0 + 2 * tig), lh_pair(brow + k0 + 8 + 2 * tig));
      }
      float* o = lr + nt * 8 + 2 * tig;
      o[gid * LH_RLR_MMA_COLS] = d[0];
      o[gid * LH_RLR_MMA_COLS + 1] = d[1];
      o[(gid + 8) * LH_RLR_MMA_COLS] = d[2];
      o[(gid + 8) * LH_RLR_MMA_COLS + 1] = d[3];
    }
  }
  __syncthreads();
  const u32 D = 2 * half;
  const u32 hv = half / NV;
  const u32 items = ncols / D * hv;
  for (u32 f = threadIdx.x; f < 16 * items; f += blockDim.x) {
    const u32 tk = f / items;
    const u32 item = f - tk * items;
    const u32 token = token0 + tk;
    if (token >= tokens) break;  // tk only grows with f
    const u32 hl = item / hv;
    const u32 j = (item - hl * hv) * NV;
    const u32 lc = hl * D + j;  // the block's column
    const i64 col = col0 + lc;  // the projection's column
    const T* src = in + static_cast<i64>(token) * ldi + col;
    const Pack<T, NV> pa = *reinterpret_cast<const Pack<T, NV>*>(src);
    const Pack<T, NV> pb = *reinterpret_cast<const Pack<T, NV>*>(src + half);
    float x1[NV], x2[NV], c1v[NV], c2v[NV];
#pragma unroll
    for (int k = 0; k < NV; k += 4) {
      // c in 16-byte loads (columns are multiples of 8; the launcher checks c's alignment).
      Pack<float, 4> p1 = {{1.f, 1.f, 1.f, 1.f}}, p2 = {{1.f, 1.f, 1.f, 1.f}};
      if (c != nullptr) {
        p1 = *reinterpret_cast<const Pack<float, 4>*>(c + col + k);
        p2 = *reinterpret_cast<const Pack<float, 4>*>(c + col + half + k);
      }
#pragma unroll
      for (int i = 0; i < 4; i++) {
        c1v[k + i] = p1.v[i];
        c2v[k + i] = p2.v[i];
      }
    }
#pragma unroll
    for (int k = 0; k < NV; k++) {
      const float l1 = rank > 0 ? lr[tk * LH_RLR_MMA_COLS + lc + k] : 0.f;
      const float l2 = rank > 0 ? lr[tk * LH_RLR_MMA_COLS + lc + half + k] : 0.f;
      x1[k] = lowrank_epilogue(Cvt<T>::to(pa.v[k]), l1, s, c1v[k]);
      x2[k] = lowrank_epilogue(Cvt<T>::to(pb.v[k]), l2, s, c2v[k]);
    }
    Pack<T, NV> o1, o2;
    if (rotate) {
      const i64 bi = token / Tn;
      const i64 t = token - static_cast<u32>(bi) * Tn;
      const float* cr = cos + bi * csb + t * cst;
      const float* sr = sin + bi * csb + t * cst;
      float c1[NV], c2[NV], s1[NV], s2[NV];
#pragma unroll
      for (int k = 0; k < NV; k += 4) {
        const Pack<float, 4> a1 = *reinterpret_cast<const Pack<float, 4>*>(cr + j + k);
        const Pack<float, 4> a2 = *reinterpret_cast<const Pack<float, 4>*>(cr + half + j + k);
        const Pack<float, 4> b1 = *reinterpret_cast<const Pack<float, 4>*>(sr + j + k);
        const Pack<float, 4> b2 = *reinterpret_cast<const Pack<float, 4>*>(sr + half + j + k);
#pragma unroll
        for (int i = 0; i < 4; i++) {
          c1[k + i] = a1.v[i];
          c2[k + i] = a2.v[i];
          s1[k + i] = b1.v[i];
          s2[k + i] = b2.v[i];
        }
      }
#pragma unroll
      for (int k = 0; k < NV; k++) {
        o1.v[k] = Cvt<T>::from(x1[k] * c1[k] - x2[k] * s1[k]);
        o2.v[k] = Cvt<T>::from(x2[k] * c2[k] + x1[k] * s2[k]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < NV; k++) {
        o1.v[k] = Cvt<T>::from(x1[k]);
        o2.v[k] = Cvt<T>::from(x2[k]);
      }
    }
    const u32 head = col / D;  // the projection's head (the side with fewer heads)
    for (u32 g = 0; g < groups; g++) {
      T* dst = out + static_cast<i64>(token) * ldo + static_cast<i64>(head * groups + g) * D + j;
      *reinterpret_cast<Pack<T, NV>*>(dst) = o1;
      *reinterpret_cast<Pack<T, NV>*>(dst + half) = o2;
    }
  }
}

#define LH_RLR_MMA_PARAMS(T, z)                                                                                        \
  const T *in##z, i64 ldi##z, T *out##z, i64 ldo##z, const T *b##z, i64 ldb##z, i64 xcol##z, int rank##z, float s##z,   \
      const float *c##z, u32 groups##z, u32 ncol##z
#define LH_RLR_MMA_CALL(T, z, ROT, G)                                                                                  \
  rope_lowrank_mma_fwd<T>(in##z, ldi##z, out##z, ldo##z, xa + xcol##z, ldx, b##z, ldb##z, rank##z, s##z, c##z, cos, sin, \
                          csb, cst, groups##z, ROT, Tn, half, tokens, (G) * LH_RLR_MMA_COLS,                           \
                          ncol##z - (G) * LH_RLR_MMA_COLS < LH_RLR_MMA_COLS ? ncol##z - (G) * LH_RLR_MMA_COLS           \
                                                                          : LH_RLR_MMA_COLS,                          \
                          lr)
// blockIdx.y: column group; gq, gk: q's and k's group counts (v's follow).
#define LH_RLR_MMA_ENTRY(T, S)                                                                                         \
  extern "C" __global__ void __launch_bounds__(128) lh_rope_lr_mma_fwd_##S(                                           \
      LH_RLR_MMA_PARAMS(T, 0), LH_RLR_MMA_PARAMS(T, 1), LH_RLR_MMA_PARAMS(T, 2), const T* xa, i64 ldx, u32 gq, u32 gk,  \
      const float* cos, const float* sin, i64 csb, i64 cst, u32 Tn, u32 half, u32 tokens) { lh_grid_dependency_sync();                            \
    __shared__ float lr[16 * LH_RLR_MMA_COLS];                                                                         \
    const u32 y = blockIdx.y;                                                                                          \
    if (y < gq) {                                                                                                      \
      LH_RLR_MMA_CALL(T, 0, 1, y);                                                                                     \
    } else if (y < gq + gk) {                                                                                          \
      LH_RLR_MMA_CALL(T, 1, 1, y - gq);                                                                                \
    } else {                                                                                                           \
      LH_RLR_MMA_CALL(T, 2, 0, y - gq - gk);                                                                           \
    }                                                                                                                  \
  }

LH_RLR_MMA_ENTRY(bf16, bf16)
LH_RLR_MMA_ENTRY(f16, f16)

// The DoRA backward with the low-rank products on tensor cores (RopeLowRankKernels.Mma): a block of 64 threads takes 16
// tokens × up to LH_RLR_MMA_COLS columns of one projection. Phase 1 (where c's gradient is wanted and there is an
// update): lr = xa·Bᵀ for its 16 tokens by mma.m16n8k16 into shared memory, as the forward. Phase 2: a thread per slice
// of 2 elements in each half of a head, all 16 tokens (8 at a time, loads issued together): d out summed over the
// groups, rotated back (d pre), c ⊙ d pre stored to out (token row stride ldo), and Σ_tokens d pre ⊙ (base + s·lr)
// into partial[blockIdx.x·ldp + column] (partial null: no sums, no phase 1).
template <typename T>
__device__ __forceinline__ void rope_lowrank_mma_bwd(const T* __restrict__ in, i64 isb, i64 ist, i64 ish, T* __restrict__ out,
                                                     i64 ldo, const T* __restrict__ base, i64 ldbase, float* __restrict__ partial,
                                                     i64 ldp, const T* __restrict__ xa, i64 ldx, const T* __restrict__ b,
                                                     i64 ldb, int rank, float s, const float* __restrict__ c,
                                                     const float* __restrict__ cos, const float* __restrict__ sin, i64 csb,
                                                     i64 cst, u32 groups, int rotate, u32 Tn, u32 half, u32 tokens, u32 col0,
                                                     u32 ncols, float* lr, i64* in_off, i64* tab_off) {
  const u32 token0 = blockIdx.x * 16;
  if (token0 >= tokens) return;  // the same for the whole block
  const int ntok = tokens - token0 < 16 ? static_cast<int>(tokens - token0) : 16;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const bool dots = partial != nullptr && rank > 0;
  if (dots) {
    const i64 r0 = token0 + gid, r1 = r0 + 8;
    const bool ok0 = r0 < tokens, ok1 = r1 < tokens;
    for (u32 nt = warp; nt < ncols / 8; nt += warps) {
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      const T* brow = b + static_cast<i64>(col0 + nt * 8 + gid) * ldb;
      for (int k0 = 0; k0 < rank; k0 += 16) {
        u32 a[4];
        a[0] = ok0 ? lh_pair(xa + r0 * ldx + k0 + 2 * tig) : 0u;
        a[1] = ok1 ? lh_pair(xa + r1 * ldx + k0 + 2 * tig) : 0u;
        a[2] = ok0 ? lh_pair(xa + r0 * ldx + k0 + 8 + 2 * tig) : 0u;
        a[3] = ok1 ? lh_pair(xa + r1 * ldx + k0 + 8 + 2 * tig) : 0u;
        Mma<T>::run(d, a, lh_pair(brow + k0 + 2 * tig), lh_pair(brow + k0 + 8 + 2 * tig));
      }
      float* o = lr + nt * 8 + 2 * tig;
      o[gid * LH_RLR_MMA_COLS] = d[0];
      o[gid * LH_RLR_MMA_COLS + 1] = d[1];
      o[(gid + 8) * LH_RLR_MMA_COLS] = d[2];
      o[(gid + 8) * LH_RLR_MMA_COLS + 1] = d[3];
    }
  }
  for (int i = threadIdx.x; i < ntok; i += blockDim.x) {
    const u32 token = token0 + i;
    const i64 bi = token / Tn;
    const i64 t = token - static_cast<u32>(bi) * Tn;
    in_off[i] = bi * isb + t * ist;
    tab_off[i] = bi * csb + t * cst;
  }
  __syncthreads();
  const u32 D = 2 * half;
  const u32 hv = half / 2;
  const u32 items = ncols / D * hv;
  for (u32 item = threadIdx.x; item < items; item += blockDim.x) {
    const u32 hl = item / hv;
    const u32 j = (item - hl * hv) * 2;
    const u32 lc = hl * D + j;        // the block's column
    const i64 col = col0 + lc;        // the projection's column
    const u32 head = col / D;         // the projection's head
    float cc1[2], cc2[2], dc1[2] = {0.f, 0.f}, dc2[2] = {0.f, 0.f};
#pragma unroll
    for (int k = 0; k < 2; k++) {
      cc1[k] = c != nullptr ? c[col + k] : 1.f;
      cc2[k] = c != nullptr ? c[col + half + k] : 1.f;
    }
    for (int t0 = 0; t0 < ntok; t0 += 8) {
      int tk[8];
#pragma unroll
      for (int tt = 0; tt < 8; tt++) tk[tt] = t0 + tt < ntok ? t0 + tt : ntok - 1;
      Pack<T, 2> ba[8], bb[8];
      if (partial != nullptr) {
#pragma unroll
        for (int tt = 0; tt < 8; tt++) {
          const T* src = base + static_cast<i64>(token0 + tk[tt]) * ldbase + col;
          ba[tt] = *reinterpret_cast<const Pack<T, 2>*>(src);
          bb[tt] = *reinterpret_cast<const Pack<T, 2>*>(src + half);
        }
      }
      float x1[8][2], x2[8][2];
#pragma unroll
      for (int tt = 0; tt < 8; tt++) x1[tt][0] = x1[tt][1] = x2[tt][0] = x2[tt][1] = 0.f;
      for (u32 g = 0; g < groups; g++) {
        Pack<T, 2> ga[8], gb[8];
#pragma unroll
        for (int tt = 0; tt < 8; tt++) {
          const T* src = in + in_off[tk[tt]] + static_cast<i64>(head * groups + g) * ish + j;
          ga[tt] = *reinterpret_cast<const Pack<T, 2>*>(src);
          gb[tt] = *reinterpret_cast<const Pack<T, 2>*>(src + half);
        }
#pragma unroll
        for (int tt = 0; tt < 8; tt++) {
#pragma unroll
          for (int k = 0; k < 2; k++) {
            x1[tt][k] += Cvt<T>::to(ga[tt].v[k]);
            x2[tt][k] += Cvt<T>::to(gb[tt].v[k]);
          }
        }
      }
#pragma unroll
      for (int tt = 0; tt < 8; tt++) {
        float y1[2], y2[2];
        if (rotate) {
          const i64 to = tab_off[tk[tt]];
          const Pack<float, 2> c1 = *reinterpret_cast<const Pack<float, 2>*>(cos + to + j);
          const Pack<float, 2> c2 = *reinterpret_cast<const Pack<float, 2>*>(cos + to + half + j);
          const Pack<float, 2> s1 = *reinterpret_cast<const Pack<float, 2>*>(sin + to + j);
          const Pack<float, 2> s2 = *reinterpret_cast<const Pack<float, 2>*>(sin + to + half + j);
#pragma unroll
          for (int k = 0; k < 2; k++) {
            y1[k] = x1[tt][k] * c1.v[k] + x2[tt][k] * s2.v[k];
            y2[k] = x2[tt][k] * c2.v[k] - x1[tt][k] * s1.v[k];
          }
        } else {
#pragma unroll
          for (int k = 0; k < 2; k++) {
            y1[k] = x1[tt][k];
            y2[k] = x2[tt][k];
          }
        }
        if (t0 + tt < ntok) {
          Pack<T, 2> o1, o2;
#pragma unroll
          for (int k = 0; k < 2; k++) {
            o1.v[k] = Cvt<T>::from(cc1[k] * y1[k]);
            o2.v[k] = Cvt<T>::from(cc2[k] * y2[k]);
          }
          T* dst = out + static_cast<i64>(token0 + tk[tt]) * ldo + col;
          *reinterpret_cast<Pack<T, 2>*>(dst) = o1;
          *reinterpret_cast<Pack<T, 2>*>(dst + half) = o2;
          if (partial != nullptr) {
#pragma unroll
            for (int k = 0; k < 2; k++) {
              const float l1 = dots ? lr[tk[tt] * LH_RLR_MMA_COLS + lc + k] : 0.f;
              const float l2 = dots ? lr[tk[tt] * LH_RLR_MMA_COLS + lc + half + k] : 0.f;
              dc1[k] = fmaf(y1[k], lowrank_inner(Cvt<T>::to(ba[tt].v[k]), l1, s), dc1[k]);
              dc2[k] = fmaf(y2[k], lowrank_inner(Cvt<T>::to(bb[tt].v[k]), l2, s), dc2[k]);
            }
          }
        }
      }
    }
    if (partial != nullptr) {
      float* row = partial + static_cast<i64>(blockIdx.x) * ldp;
#pragma unroll
      for (int k = 0; k < 2; k++) {
        row[col + k] = dc1[k];
        row[col + half + k] = dc2[k];
      }
    }
  }
}

#define LH_RLR_MMA_BWD_PARAMS(T, z)                                                                                    \
  const T *in##z, i64 isb##z, i64 ist##z, i64 ish##z, T *out##z, i64 ldo##z, const T *base##z, i64 ldbase##z,          \
      float *partial##z, const T *b##z, i64 ldb##z, i64 xcol##z, int rank##z, float s##z, const float *c##z,          \
      u32 groups##z, u32 ncol##z
#define LH_RLR_MMA_BWD_CALL(T, z, ROT, G)                                                                              \
  rope_lowrank_mma_bwd<T>(in##z, isb##z, ist##z, ish##z, out##z, ldo##z, base##z, ldbase##z, partial##z, ldp,          \
                          xa + xcol##z, ldx, b##z, ldb##z, rank##z, s##z, c##z, cos, sin, csb, cst, groups##z, ROT, Tn,  \
                          half, tokens, (G) * LH_RLR_MMA_COLS,                                                         \
                          ncol##z - (G) * LH_RLR_MMA_COLS < LH_RLR_MMA_COLS ? ncol##z - (G) * LH_RLR_MMA_COLS           \
                                                                          : LH_RLR_MMA_COLS,                          \
                          lr, in_off, tab_off)
#define LH_RLR_MMA_BWD_ENTRY(T, S)                                                                                     \
  extern "C" __global__ void __launch_bounds__(64) lh_rope_lr_mma_bwd_##S(                                            \
      LH_RLR_MMA_BWD_PARAMS(T, 0), LH_RLR_MMA_BWD_PARAMS(T, 1), LH_RLR_MMA_BWD_PARAMS(T, 2), const T* xa, i64 ldx,      \
      i64 ldp, u32 gq, u32 gk, const float* cos, const float* sin, i64 csb, i64 cst, u32 Tn, u32 half, u32 tokens) { lh_grid_dependency_sync();   \
    __shared__ float lr[16 * LH_RLR_MMA_COLS];                                                                         \
    __shared__ i64 in_off[16], tab_off[16];                                                                            \
    const u32 y = blockIdx.y;                                                                                          \
    if (y < gq) {                                                                                                      \
      LH_RLR_MMA_BWD_CALL(T, 0, 1, y);                                                                                 \
    } else if (y < gq + gk) {                                                                                          \
      LH_RLR_MMA_BWD_CALL(T, 1, 1, y - gq);                                                                            \
    } else {                                                                                                           \
      LH_RLR_MMA_BWD_CALL(T, 2, 0, y - gq - gk);                                                                       \
    }                                                                                                                  \
  }

LH_RLR_MMA_BWD_ENTRY(bf16, bf16)
LH_RLR_MMA_BWD_ENTRY(f16, f16)
""";
}
