using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// Row norms of LoRA weights in fp32, each in one CUDA kernel launch (elsewhere, or with LORAHUB_LORA_ROWSCALE_KERNELS=0,
/// null and the caller's tensor ops run):
/// <list type="bullet">
/// <item><see cref="row_norms_squared"/>: ‖W_i‖² of a frozen weight in one read (one block per row sums the squares in fp32
/// registers, where the tensor ops (widen to fp32, square, sum) read and write an fp32 copy of W more).</item>
/// <item><see cref="low_rank_row_norms"/>: DoRA's ‖W0_i + s·Σ_k B_ik·A_k‖ directly, V formed in fp32 registers (never
/// stored), one read of W0: the ~12 tensor ops of the factored norm (W0·Aᵀ, A·Aᵀ, casts, addmm, mul, sum, add, clamp,
/// sqrt) and its cached ‖W0‖² become one launch, which matters because DoRA computes it for every projection of every
/// training step and the host, not the GPU, sets the pace there. LORAHUB_DORA_NORM_KERNEL=0 turns off only this one.</item>
/// </list>
/// fp32, fp16, bf16 contiguous 2-D weights.
/// </summary>
public static class LoraWeightNorms
{
    private static readonly CudaProgram program = new("lora_weight_norms.cu", Source);

    /// <summary>‖W_i‖² (rows, fp32) of <paramref name="w"/> (rows × cols), or null where the kernel does not apply.</summary>
    public static Tensor? row_norms_squared(Tensor w)
    {
        if (!LoraRowScaleKernels.Enabled || !Usable(w) || w.dim() != 2 || w.numel() == 0 || !w.is_contiguous()
            || !LoraRowScaleKernels.Compiles(program, Source, DeviceIndex(w)))
            return null;
        long rows = w.size(0), cols = w.size(1);
        var output = empty([rows], ScalarType.Float32, w.device);
        var v = VectorWidth(w.dtype);
        var vec = cols % v == 0 && Aligned16(Ptr(w));
        var work = vec ? cols / v : cols;
        program.Function(DeviceIndex(w), $"lh_lora_row_sumsq_{Suffix(w.dtype)}_{(vec ? "v" : "1")}")
            .Launch((int)rows, (int)Math.Clamp((work + 31) / 32 * 32, 64, 512), 0, new KernelArgs().Ptr(Ptr(w)).Ptr(Ptr(output)).I64(cols));
        return output;
    }

    /// <summary>Whether <see cref="low_rank_row_norms"/> may run its kernel (default on; LORAHUB_DORA_NORM_KERNEL=0: off).</summary>
    public static bool LowRankNormKernel { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_DORA_NORM_KERNEL")?.Trim() != "0";

    private static long lowRankLaunches;

    /// <summary>Launches of the <see cref="low_rank_row_norms"/> kernel so far (tests: a silent fallback must not pass).</summary>
    public static long LowRankNormLaunches => Interlocked.Read(ref lowRankLaunches);

    // Rows per block of the low-rank norm kernel (8 warps of 4 rows: LH_LR_WARPS · LH_LR_ROWS below).
    private const int LowRankBlockRows = 32;

    /// <summary>
    /// ‖W_i + s·Σ_k B_ik·A_k‖ (rows, fp32) for <paramref name="w"/> (rows × cols), <paramref name="a"/> (r × cols) and
    /// <paramref name="b"/> (rows × r), each contiguous and fp32, fp16 or bf16, on one CUDA device: DoRA's weight norm
    /// (PEFT's get_weight_norm) with V accumulated in fp32 from W's own values and fp32 A, B — the exact V up to fp32
    /// rounding, no cancellation as in ‖W‖² + cross terms. Not differentiable (a detached norm); null where the kernel does
    /// not apply (CPU, fp64, other layouts, switched off, no rows), and the caller computes it with tensor ops.
    /// <paramref name="output"/>: a tensor to write the norms into (rows, fp32, contiguous, on W's device; e.g. a cache's
    /// stale norm, saving an allocation per call); it is returned. Otherwise, or when it does not fit, a new tensor.
    /// </summary>
    public static Tensor? low_rank_row_norms(Tensor w, Tensor a, Tensor b, double scaling, Tensor? output = null)
    {
        if (!LowRankNormKernel || !LoraRowScaleKernels.Enabled || !Usable(w) || w.dim() != 2 || a.dim() != 2 || b.dim() != 2)
            return null;
        long rows = w.size(0), cols = w.size(1), rank = a.size(0);
        if (rows == 0 || rank == 0 || rank > int.MaxValue || a.size(1) != cols || b.size(0) != rows || b.size(1) != rank
            || !Supported(a.dtype) || !Supported(b.dtype) || !torchx.same_device(a, w) || !torchx.same_device(b, w)
            || !w.is_contiguous() || !a.is_contiguous() || !b.is_contiguous())
            return null;
        var device = DeviceIndex(w);
        if (!LoraRowScaleKernels.Compiles(program, Source, device)) return null;
        if (output is null || output.dtype != ScalarType.Float32 || output.dim() != 1 || output.size(0) != rows || !output.is_contiguous()
            || !torchx.same_device(output, w))
            output = empty([rows], ScalarType.Float32, w.device);
        var pw = Ptr(w);
        var v = VectorWidth(w.dtype);
        var vec = cols % v == 0 && Aligned16(pw);
        program.Function(device, $"lh_lora_lowrank_norms_{Suffix(w.dtype)}_{(vec ? "v" : "1")}")
            .Launch((int)((rows + LowRankBlockRows - 1) / LowRankBlockRows), 256, 0,
                new KernelArgs().Ptr(pw).Ptr(Ptr(a)).I32(Code(a.dtype)).Ptr(Ptr(b)).I32(Code(b.dtype)).F32((float)scaling)
                    .Ptr(Ptr(output)).I64(rows).I64(cols).I32((int)rank));
        Interlocked.Increment(ref lowRankLaunches);
        return output;
    }

    // One block per row (as the RMSNorm kernels): strided vector loads, fp32 sum of squares, block_sum.
    private const string Source = """
        #include "lh_common.cuh"

        template <typename T, int N>
        __device__ __forceinline__ void row_sumsq(const T* __restrict__ w, float* __restrict__ out, i64 cols) {
          __shared__ float red[32];
          const i64 row = blockIdx.x;
          const T* wr = w + row * cols;
          const i64 nvec = cols / N;
          float ss = 0.f;
          for (i64 i = threadIdx.x; i < nvec; i += blockDim.x) {
            const Pack<T, N> p = load_pack<T, N>(wr, i);
        #pragma unroll
            for (int k = 0; k < N; k++) {
              const float v = Cvt<T>::to(p.v[k]);
              ss = fmaf(v, v, ss);
            }
          }
          ss = block_sum(ss, red);
          if (threadIdx.x == 0) out[row] = ss;
        }

        #define LH_WIDTH_1(T) 1
        #define LH_WIDTH_v(T) (16 / sizeof(T))

        #define LH_SUMSQ_ENTRIES(T, S, V)                                                                        \
          extern "C" __global__ void lh_lora_row_sumsq_##S##_##V(const T* w, float* out, i64 cols) {            \
            row_sumsq<T, LH_WIDTH_##V(T)>(w, out, cols);                                                        \
          }

        LH_SUMSQ_ENTRIES(float, f32, 1)
        LH_SUMSQ_ENTRIES(float, f32, v)
        LH_SUMSQ_ENTRIES(f16, f16, 1)
        LH_SUMSQ_ENTRIES(f16, f16, v)
        LH_SUMSQ_ENTRIES(bf16, bf16, 1)
        LH_SUMSQ_ENTRIES(bf16, bf16, v)

        // ‖W_i + s·Σ_k B_ik·A_k‖ per row. A block is 8 warps of 4 rows each; a warp walks its rows' columns in tiles of 32
        // vectors of N (lane = vector), holding V for 4 rows × N columns in fp32 registers: W's values, plus the rank
        // updates, then squared into per-row sums. A (r × cols) and s·B (the block's 32 rows × r) pass through shared
        // memory in fp32, 16 ranks at a time, so every A value read serves the block's 32 rows. A tile's A columns are
        // stored permuted, float groups of G by lane, so each lane reads its N columns with conflict-free vector loads.
        #define LH_LR_WARPS 8
        #define LH_LR_ROWS 4
        #define LH_LR_KC 16

        template <typename T, int N>
        __device__ __forceinline__ void lowrank_norms(const T* __restrict__ w, const void* __restrict__ a, int a_type,
                                                      const void* __restrict__ b, int b_type, float s, float* __restrict__ out,
                                                      i64 rows, i64 cols, int rank) {
          constexpr int G = N >= 4 ? 4 : 1;
          constexpr int TILE = 32 * N;
          constexpr int BR = LH_LR_WARPS * LH_LR_ROWS;
          // Pack<float, 4> storage: 16-byte aligned for the vector reads.
          __shared__ Pack<float, 4> as_storage[LH_LR_KC * TILE / 4 > 0 ? LH_LR_KC * TILE / 4 : 1];
          float (*as)[TILE] = reinterpret_cast<float (*)[TILE]>(as_storage);
          __shared__ Pack<float, 4> bs_storage[BR * LH_LR_KC / 4];
          float (*bs)[LH_LR_KC] = reinterpret_cast<float (*)[LH_LR_KC]>(bs_storage);
          const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
          const i64 block_row = static_cast<i64>(blockIdx.x) * BR;
          const i64 nvec = cols / N;
          float ss[LH_LR_ROWS];
        #pragma unroll
          for (int q = 0; q < LH_LR_ROWS; q++) ss[q] = 0.f;
          for (i64 t0 = 0; t0 < nvec; t0 += 32) {
            const i64 vc = t0 + lane;
            float v[LH_LR_ROWS][N];
        #pragma unroll
            for (int q = 0; q < LH_LR_ROWS; q++) {
              const i64 row = block_row + warp * LH_LR_ROWS + q;
              if (row < rows && vc < nvec) {
                const Pack<T, N> p = load_pack<T, N>(w + row * cols, vc);
        #pragma unroll
                for (int n = 0; n < N; n++) v[q][n] = Cvt<T>::to(p.v[n]);
              } else {
        #pragma unroll
                for (int n = 0; n < N; n++) v[q][n] = 0.f;
              }
            }
            for (int k0 = 0; k0 < rank; k0 += LH_LR_KC) {
              __syncthreads();  // the previous chunk is consumed
              for (int e = threadIdx.x; e < LH_LR_KC * TILE; e += blockDim.x) {
                const int k = e / TILE, c = e % TILE;
                const i64 col = t0 * N + c;
                const float x = k0 + k < rank && col < cols ? load_any(a, static_cast<i64>(k0 + k) * cols + col, a_type) : 0.f;
                const int l = c / N, n = c % N;
                as[k][(n / G) * (32 * G) + l * G + n % G] = x;
              }
              for (int e = threadIdx.x; e < BR * LH_LR_KC; e += blockDim.x) {
                const int q = e / LH_LR_KC, k = e % LH_LR_KC;
                const i64 row = block_row + q;
                bs[q][k] = k0 + k < rank && row < rows ? s * load_any(b, row * rank + k0 + k, b_type) : 0.f;
              }
              __syncthreads();
              const int kc = rank - k0 < LH_LR_KC ? rank - k0 : LH_LR_KC;
              // s·B of the warp's rows for this chunk in registers (broadcast reads), so the k loop reads only A from shared.
              float bq[LH_LR_ROWS][LH_LR_KC];
        #pragma unroll
              for (int q = 0; q < LH_LR_ROWS; q++) {
        #pragma unroll
                for (int g = 0; g < LH_LR_KC / 4; g++) {
                  const Pack<float, 4> p = *reinterpret_cast<const Pack<float, 4>*>(&bs[warp * LH_LR_ROWS + q][g * 4]);
        #pragma unroll
                  for (int j = 0; j < 4; j++) bq[q][g * 4 + j] = p.v[j];
                }
              }
        #pragma unroll
              for (int k = 0; k < LH_LR_KC; k++) {
                if (k < kc) {
                  float av[N];
        #pragma unroll
                  for (int g = 0; g < N / G; g++) {
                    const Pack<float, G> p = *reinterpret_cast<const Pack<float, G>*>(&as[k][g * 32 * G + lane * G]);
        #pragma unroll
                    for (int j = 0; j < G; j++) av[g * G + j] = p.v[j];
                  }
        #pragma unroll
                  for (int q = 0; q < LH_LR_ROWS; q++) {
        #pragma unroll
                    for (int n = 0; n < N; n++) v[q][n] = fmaf(bq[q][k], av[n], v[q][n]);
                  }
                }
              }
            }
        #pragma unroll
            for (int q = 0; q < LH_LR_ROWS; q++) {
        #pragma unroll
              for (int n = 0; n < N; n++) ss[q] = fmaf(v[q][n], v[q][n], ss[q]);
            }
          }
        #pragma unroll
          for (int q = 0; q < LH_LR_ROWS; q++) {
            const float total = warp_sum(ss[q]);
            const i64 row = block_row + warp * LH_LR_ROWS + q;
            if (lane == 0 && row < rows) out[row] = sqrtf(total);
          }
        }

        #define LH_LOWRANK_ENTRIES(T, S, V)                                                                              \
          extern "C" __global__ void __launch_bounds__(256) lh_lora_lowrank_norms_##S##_##V(                              \
              const T* w, const void* a, int a_type, const void* b, int b_type, float s, float* out, i64 rows, i64 cols, \
              int rank) {                                                                                                 \
            lowrank_norms<T, LH_WIDTH_##V(T)>(w, a, a_type, b, b_type, s, out, rows, cols, rank);                         \
          }

        LH_LOWRANK_ENTRIES(float, f32, 1)
        LH_LOWRANK_ENTRIES(float, f32, v)
        LH_LOWRANK_ENTRIES(f16, f16, 1)
        LH_LOWRANK_ENTRIES(f16, f16, v)
        LH_LOWRANK_ENTRIES(bf16, bf16, 1)
        LH_LOWRANK_ENTRIES(bf16, bf16, v)
        """;
}
