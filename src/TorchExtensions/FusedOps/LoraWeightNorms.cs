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

    // What runs when the program does not compile (CudaProgram.Compiles says so once on stderr).
    private const string Instead = "DoRA's norms take the tensor ops";

    /// <summary>NVRTC's message when these kernels did not compile (null: they did, or were not tried); tests read it.</summary>
    public static string? CompileFailure => program.CompileFailure;

    /// <summary>‖W_i‖² (rows, fp32) of <paramref name="w"/> (rows × cols), or null where the kernel does not apply.</summary>
    public static Tensor? row_norms_squared(Tensor w)
    {
        if (!LoraRowScaleKernels.Enabled || !Usable(w) || w.dim() != 2 || w.numel() == 0 || !w.is_contiguous()
            || !program.Compiles(DeviceIndex(w), Instead))
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

    // Rows and threads per block of the low-rank norm kernel (8 warps of 4 rows: LH_LR_WARPS · LH_LR_ROWS below; the
    // kernel is written for exactly LH_LR_THREADS threads).
    private const int LowRankBlockRows = 32, LowRankThreads = 256;

    /// <summary>
    /// ‖W_i + s·Σ_k B_ik·A_k‖ (rows, fp32) for <paramref name="w"/> (rows × cols), <paramref name="a"/> (r × cols) and
    /// <paramref name="b"/> (rows × r), each contiguous and fp32, fp16 or bf16 (A and B of one type), on one CUDA device:
    /// DoRA's weight norm (PEFT's get_weight_norm) with V accumulated in fp32 from the values of W, A and B as they are —
    /// the exact V up to fp32 rounding, no cancellation as in ‖W‖² + cross terms. Not differentiable (a detached norm); null where the kernel does
    /// not apply (CPU, fp64, other layouts, switched off, no rows), and the caller computes it with tensor ops.
    /// <paramref name="output"/>: a tensor to write the norms into (rows, fp32, contiguous, on W's device; e.g. a cache's
    /// stale norm, saving an allocation per call); it is returned. Otherwise, or when it does not fit, a new tensor.
    /// </summary>
    public static Tensor? low_rank_row_norms(Tensor w, Tensor a, Tensor b, double scaling, Tensor? output = null)
    {
        if (!LowRankNormKernel || !LoraRowScaleKernels.Enabled || !Usable(w) || w.dim() != 2 || a.dim() != 2 || b.dim() != 2)
            return null;
        long rows = w.size(0), cols = w.size(1), rank = a.size(0);
        var adapterType = a.dtype;
        if (rows == 0 || rank == 0 || rank > int.MaxValue || a.size(1) != cols || b.size(0) != rows || b.size(1) != rank
            || !Supported(adapterType) || b.dtype != adapterType || !torchx.same_device(a, w) || !torchx.same_device(b, w)
            || !w.is_contiguous() || !a.is_contiguous() || !b.is_contiguous())
            return null;
        var device = DeviceIndex(w);
        if (!program.Compiles(device, Instead)) return null;
        if (output is null || output.dtype != ScalarType.Float32 || output.dim() != 1 || output.size(0) != rows || !output.is_contiguous()
            || !torchx.same_device(output, w))
            output = empty([rows], ScalarType.Float32, w.device);
        var pw = Ptr(w);
        var v = VectorWidth(w.dtype);
        var vec = cols % v == 0 && Aligned16(pw);
        program.Function(device, $"lh_lora_lowrank_norms_{Suffix(w.dtype)}_{Suffix(adapterType)}_{(vec ? "v" : "1")}")
            .Launch((int)((rows + LowRankBlockRows - 1) / LowRankBlockRows), LowRankThreads, 0,
                new KernelArgs().Ptr(pw).Ptr(Ptr(a)).Ptr(Ptr(b)).F32((float)scaling).Ptr(Ptr(output)).I64(rows).I64(cols).I32((int)rank));
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
        // memory in fp32, 16 ranks at a time (a "step": one tile, one rank chunk), so every A value read serves the block's
        // 32 rows. A tile's A columns are stored permuted, float groups of G by lane, so each lane reads its N columns with
        // conflict-free vector loads. Software pipelined: the next step's A and B values and the next tile's W are loaded
        // into registers while this step computes, raw and unconditionally (an index outside the tensors reads element 0
        // and a validity bit zeroes it later), so no instruction waits for a load before the FMAs and the loads' latency
        // hides behind them: a block is alone on its SM for the small projections, where no other warps would hide it.
        #define LH_LR_THREADS 256
        #define LH_LR_WARPS 8
        #define LH_LR_ROWS 4
        #define LH_LR_KC 16

        // The raw A and B values thread `tid` stages for the step (tile, chunk): element e = i·THREADS + tid of the chunk's
        // KC × TILE slice of A and of its BR × KC slice of B; bit i (A) and SA + i (B) of `valid` say which are inside.
        template <typename TA, int N, int SA, int SB>
        __device__ __forceinline__ void lr_load_ab(TA (&ra)[SA], TA (&rb)[SB], u32& valid, const TA* __restrict__ a,
                                                   const TA* __restrict__ b, i64 tile, int chunk, i64 block_row, i64 rows,
                                                   i64 cols, int rank, int tid) {
          constexpr int TILE = 32 * N;
          const int k0 = chunk * LH_LR_KC;
          valid = 0;
        #pragma unroll
          for (int i = 0; i < SA; i++) {
            const int e = i * LH_LR_THREADS + tid;
            const int k = e / TILE, c = e % TILE;
            const i64 col = tile * TILE + c;
            const bool ok = k0 + k < rank && col < cols;
            ra[i] = a[ok ? static_cast<i64>(k0 + k) * cols + col : 0];
            valid |= static_cast<u32>(ok) << i;
          }
        #pragma unroll
          for (int i = 0; i < SB; i++) {
            const int e = i * LH_LR_THREADS + tid;
            const int q = e / LH_LR_KC, k = e % LH_LR_KC;
            const i64 row = block_row + q;
            const bool ok = e < LH_LR_WARPS * LH_LR_ROWS * LH_LR_KC && k0 + k < rank && row < rows;
            rb[i] = b[ok ? row * rank + k0 + k : 0];
            valid |= static_cast<u32>(ok) << (SA + i);
          }
        }

        // W of the warp's rows for a tile, raw: the lane's vector of N columns per row; bit q of `valid`: row q inside W.
        template <typename T, int N>
        __device__ __forceinline__ void lr_load_w(Pack<T, N> (&rw)[LH_LR_ROWS], u32& valid, const T* __restrict__ w, i64 tile,
                                                  i64 block_row, int warp, int lane, i64 rows, i64 cols, i64 nvec) {
          const i64 vc = tile * 32 + lane;
          valid = 0;
        #pragma unroll
          for (int q = 0; q < LH_LR_ROWS; q++) {
            const i64 row = block_row + warp * LH_LR_ROWS + q;
            const bool ok = row < rows && vc < nvec;
            rw[q] = load_pack<T, N>(w + (ok ? row * cols : 0), ok ? vc : 0);
            valid |= static_cast<u32>(ok) << q;
          }
        }

        // v[q][n] += Σ_k s·B[q][k]·A[k][lane's column n] over the chunk's ranks (all 16 when Full, else the first kc).
        template <int N, bool Full>
        __device__ __forceinline__ void lr_chunk_fma(float (&v)[LH_LR_ROWS][N], const float (&bq)[LH_LR_ROWS][LH_LR_KC],
                                                     float (*as)[32 * N], int lane, int kc) {
          constexpr int G = N >= 4 ? 4 : 1;
        #pragma unroll
          for (int k = 0; k < LH_LR_KC; k++) {
            if (Full || k < kc) {
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

        template <typename T, typename TA, int N>
        __device__ __forceinline__ void lowrank_norms(const T* __restrict__ w, const TA* __restrict__ a, const TA* __restrict__ b,
                                                      float s, float* __restrict__ out, i64 rows, i64 cols, int rank) {
          constexpr int G = N >= 4 ? 4 : 1;
          constexpr int TILE = 32 * N;                                   // columns per tile
          constexpr int BR = LH_LR_WARPS * LH_LR_ROWS;                   // rows per block
          constexpr int SA = LH_LR_KC * TILE / LH_LR_THREADS;            // A values each thread stages per step
          constexpr int SB = (BR * LH_LR_KC + LH_LR_THREADS - 1) / LH_LR_THREADS;  // B values each thread stages per step
          __shared__ Pack<float, 4> as_storage[LH_LR_KC * TILE / 4];
          __shared__ Pack<float, 4> bs_storage[BR * LH_LR_KC / 4];
          float (*as)[TILE] = reinterpret_cast<float (*)[TILE]>(as_storage);
          float (*bs)[LH_LR_KC] = reinterpret_cast<float (*)[LH_LR_KC]>(bs_storage);
          const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
          const i64 block_row = static_cast<i64>(blockIdx.x) * BR;
          const i64 nvec = cols / N;
          const i64 ntiles = (nvec + 31) / 32;
          const int nchunks = (rank + LH_LR_KC - 1) / LH_LR_KC;

          TA ra[SA], rb[SB];          // the next step's A and B values, raw
          Pack<T, N> rw[LH_LR_ROWS];  // the next tile's W
          u32 valid_ab = 0, valid_w = 0;
          float ss[LH_LR_ROWS];
        #pragma unroll
          for (int q = 0; q < LH_LR_ROWS; q++) ss[q] = 0.f;
          if (ntiles > 0) {
            lr_load_ab<TA, N, SA, SB>(ra, rb, valid_ab, a, b, 0, 0, block_row, rows, cols, rank, tid);
            lr_load_w<T, N>(rw, valid_w, w, 0, block_row, warp, lane, rows, cols, nvec);
          }
          for (i64 tile = 0; tile < ntiles; tile++) {
            float v[LH_LR_ROWS][N];
        #pragma unroll
            for (int q = 0; q < LH_LR_ROWS; q++) {
              const bool ok = (valid_w >> q) & 1u;
        #pragma unroll
              for (int n = 0; n < N; n++) v[q][n] = ok ? Cvt<T>::to(rw[q].v[n]) : 0.f;
            }
            if (tile + 1 < ntiles) lr_load_w<T, N>(rw, valid_w, w, tile + 1, block_row, warp, lane, rows, cols, nvec);
            for (int chunk = 0; chunk < nchunks; chunk++) {
              __syncthreads();  // the previous step is done with the shared tiles
        #pragma unroll
              for (int i = 0; i < SA; i++) {
                const int e = i * LH_LR_THREADS + tid;
                const int k = e / TILE, c = e % TILE;
                const int l = c / N, n = c % N;
                as[k][(n / G) * (32 * G) + l * G + n % G] = (valid_ab >> i) & 1u ? Cvt<TA>::to(ra[i]) : 0.f;
              }
        #pragma unroll
              for (int i = 0; i < SB; i++) {
                const int e = i * LH_LR_THREADS + tid;
                if (e < BR * LH_LR_KC) bs[e / LH_LR_KC][e % LH_LR_KC] = (valid_ab >> (SA + i)) & 1u ? s * Cvt<TA>::to(rb[i]) : 0.f;
              }
              __syncthreads();
              // The next step's A and B: in flight while this one computes.
              if (chunk + 1 < nchunks) lr_load_ab<TA, N, SA, SB>(ra, rb, valid_ab, a, b, tile, chunk + 1, block_row, rows, cols, rank, tid);
              else if (tile + 1 < ntiles) lr_load_ab<TA, N, SA, SB>(ra, rb, valid_ab, a, b, tile + 1, 0, block_row, rows, cols, rank, tid);
              const int kc = rank - chunk * LH_LR_KC < LH_LR_KC ? rank - chunk * LH_LR_KC : LH_LR_KC;
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
              // A whole chunk (every rank when r is a multiple of 16) without per-rank branches, so the shared reads of
              // later ranks can be issued early; a partial last chunk checks each rank.
              if (kc == LH_LR_KC) lr_chunk_fma<N, true>(v, bq, as, lane, kc);
              else lr_chunk_fma<N, false>(v, bq, as, lane, kc);
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

        // lh_lora_lowrank_norms_<W type>_<A, B type>_<v: 16-byte vectors of W | 1>.
        #define LH_LOWRANK_ENTRY(T, S, TA, SA_, V)                                                                      \
          extern "C" __global__ void __launch_bounds__(LH_LR_THREADS) lh_lora_lowrank_norms_##S##_##SA_##_##V(          \
              const T* w, const TA* a, const TA* b, float s, float* out, i64 rows, i64 cols, int rank) {                \
            lowrank_norms<T, TA, LH_WIDTH_##V(T)>(w, a, b, s, out, rows, cols, rank);                                   \
          }
        #define LH_LOWRANK_ENTRIES(T, S)                                                                                 \
          LH_LOWRANK_ENTRY(T, S, float, f32, 1) LH_LOWRANK_ENTRY(T, S, float, f32, v)                                     \
          LH_LOWRANK_ENTRY(T, S, f16, f16, 1) LH_LOWRANK_ENTRY(T, S, f16, f16, v)                                         \
          LH_LOWRANK_ENTRY(T, S, bf16, bf16, 1) LH_LOWRANK_ENTRY(T, S, bf16, bf16, v)

        LH_LOWRANK_ENTRIES(float, f32)
        LH_LOWRANK_ENTRIES(f16, f16)
        LH_LOWRANK_ENTRIES(bf16, bf16)
        """;
}
