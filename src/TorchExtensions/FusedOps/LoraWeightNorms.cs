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
/// training step and the host, not the GPU, sets the pace there. LORAHUB_DORA_NORM_KERNEL=0 turns off only this one
/// (and the grouped one).</item>
/// <item><see cref="grouped_low_rank_row_norms"/>: the same norms for many projections (a model's) in one launch, with
/// DoRA's row scale c = m/‖V‖ written beside them (LoraWeightNorms.Grouped.cs).</item>
/// </list>
/// fp32, fp16, bf16 contiguous 2-D weights.
/// </summary>
public static partial class LoraWeightNorms
{
    private static readonly CudaProgram program = new("lora_weight_norms.cu", Source, dependentLaunch: true);

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

    // Rows and threads per block of the low-rank norm kernel (8 warps of 8 rows: LH_LR_WARPS · LH_LR_ROWS below; the
    // kernel is written for exactly LH_LR_THREADS threads), and its vector width (LH_LR_N_v: columns per lane).
    private const int LowRankBlockRows = 64, LowRankThreads = 256, LowRankVector = 4;

    /// <summary>
    /// Blocks per SM the low-rank norm kernel's column splits may fill at most (default 2: the kernel's resident blocks
    /// per SM, so the grid is one wave; LORAHUB_DORA_NORM_BLOCKS_PER_SM, a tuning knob): the work per element is r fp32
    /// FMAs, as much time as reading W0, so a projection with few 64-row blocks (k/v: 8 of them) must still occupy every
    /// SM. Measured on an H200 (llama-1b, r 16, µs per launch): one wave of long blocks beats more, shorter ones — 8192×2048
    /// 31 (2 splits) vs 35 (8), 2048×8192 31 (8 splits) vs 36 (32), 2048×2048 11 (8 splits) vs 12.5 (16).
    /// </summary>
    public static int LowRankBlocksPerSm { get; set; } =
        int.TryParse(Environment.GetEnvironmentVariable("LORAHUB_DORA_NORM_BLOCKS_PER_SM"), out var n) && n > 0 ? n : 2;

    // Per device: the column splits' partial sums (fp32) and the tickets (int32, zero between launches: the last block of
    // a row range resets its own) of the low-rank norm kernel. Kernels run in order on the legacy stream, so one launch
    // at a time uses them; they only grow.
    private sealed class Workspace
    {
        public Tensor? Partial, Tickets;
        public IntPtr PartialPtr, TicketsPtr;
    }

    private static readonly Dictionary<int, Workspace> workspaces = new();

    private static (IntPtr partial, IntPtr tickets) LowRankWorkspace(Tensor w, int device, long partialFloats, long tickets)
    {
        lock (workspaces)
        {
            if (!workspaces.TryGetValue(device, out var ws)) workspaces[device] = ws = new Workspace();
            if (ws.Partial is null || ws.Partial.numel() < partialFloats)
            {
                ws.Partial?.Dispose();
                ws.Partial = empty([Math.Max(partialFloats, 1L << 16)], ScalarType.Float32, w.device).DetachFromDisposeScope();
                ws.PartialPtr = Ptr(ws.Partial);
            }
            if (ws.Tickets is null || ws.Tickets.numel() < tickets)
            {
                ws.Tickets?.Dispose();
                ws.Tickets = zeros([Math.Max(tickets, 1L << 10)], ScalarType.Int32, w.device).DetachFromDisposeScope();
                ws.TicketsPtr = Ptr(ws.Tickets);
            }
            return (ws.PartialPtr, ws.TicketsPtr);
        }
    }

    /// <summary>
    /// ‖W_i + s·Σ_k B_ik·A_k‖ (rows, fp32) for <paramref name="w"/> (rows × cols), <paramref name="a"/> (r × cols) and
    /// <paramref name="b"/> (rows × r), each contiguous and fp32, fp16 or bf16 (A and B of one type), on one CUDA device:
    /// DoRA's weight norm (PEFT's get_weight_norm) with V accumulated in fp32 from the values of W, A and B as they are —
    /// V_ij = W_ij, then fmaf(s·B_ik, A_kj, V_ij) for k = 0, 1, …: the exact V up to fp32 rounding, no cancellation as in
    /// ‖W‖² + cross terms. One launch, deterministic (split columns are summed in a fixed order). Not differentiable (a
    /// detached norm); null where the kernel does not apply (CPU, fp64, other layouts, switched off, no rows), and the
    /// caller computes it with tensor ops.
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
            || cols >= int.MaxValue / 8 || !Supported(adapterType) || b.dtype != adapterType || !torchx.same_device(a, w)
            || !torchx.same_device(b, w) || !w.is_contiguous() || !a.is_contiguous() || !b.is_contiguous())
            return null;
        var device = DeviceIndex(w);
        if (!program.Compiles(device, Instead)) return null;
        if (output is null || output.dtype != ScalarType.Float32 || output.dim() != 1 || output.size(0) != rows || !output.is_contiguous()
            || !torchx.same_device(output, w))
            output = empty([rows], ScalarType.Float32, w.device);
        IntPtr pw = Ptr(w), pa = Ptr(a);
        // Vectors of 4 columns of W and A (each row then starts aligned too), else one column per lane.
        var vec = cols % LowRankVector == 0 && (long)pw % (LowRankVector * w.ElementSize) == 0
            && (long)pa % (LowRankVector * a.ElementSize) == 0;
        var width = vec ? LowRankVector : 1;
        long rowBlocks = (rows + LowRankBlockRows - 1) / LowRankBlockRows, tiles = (cols / width + 31) / 32;
        // Split the column tiles over as many blocks as one wave holds (see LowRankBlocksPerSm), at most 65535 (grid y).
        var wave = (long)LowRankBlocksPerSm * CudaKernels.MultiprocessorCount(device);
        var splits = Math.Min(Math.Max(wave / rowBlocks, 1), Math.Max(Math.Min(tiles, 65535), 1));
        var tilesPerSplit = Math.Max((tiles + splits - 1) / splits, 1);
        splits = Math.Max((tiles + tilesPerSplit - 1) / tilesPerSplit, 1);
        var (partial, tickets) = splits > 1 ? LowRankWorkspace(w, device, splits * rows, rowBlocks) : (IntPtr.Zero, IntPtr.Zero);
        program.Function(device, $"lh_lora_lowrank_norms_{Suffix(w.dtype)}_{Suffix(adapterType)}_{(vec ? "v" : "1")}")
            .Launch(new Dim3(checked((uint)rowBlocks), (uint)splits), LowRankThreads, 0,
                new KernelArgs().Ptr(pw).Ptr(pa).Ptr(Ptr(b)).F32((float)scaling).Ptr(Ptr(output)).Ptr(partial).Ptr(tickets)
                    .I64(rows).I64(cols).I32((int)rank).I64(tilesPerSplit));
        Interlocked.Increment(ref lowRankLaunches);
        return output;
    }

    // The plain kernels: the row sums of squares, and the low-rank norms of one projection per launch.
    private const string Source = """
        #include "lh_common.cuh"

        """ + SumSqSource + LowRankDevice + LowRankEntries;

    // One block per row (as the RMSNorm kernels): strided vector loads, fp32 sum of squares, block_sum.
    private const string SumSqSource = """
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
          extern "C" __global__ void lh_lora_row_sumsq_##S##_##V(const T* w, float* out, i64 cols) { lh_grid_dependency_sync();            \
            row_sumsq<T, LH_WIDTH_##V(T)>(w, out, cols);                                                        \
          }

        LH_SUMSQ_ENTRIES(float, f32, 1)
        LH_SUMSQ_ENTRIES(float, f32, v)
        LH_SUMSQ_ENTRIES(f16, f16, 1)
        LH_SUMSQ_ENTRIES(f16, f16, v)
        LH_SUMSQ_ENTRIES(bf16, bf16, 1)
        LH_SUMSQ_ENTRIES(bf16, bf16, v)

        """;

    // The low-rank norm kernels' device code (both programs).
    private const string LowRankDevice = """
        // ‖W_i + s·Σ_k B_ik·A_k‖ per row. A block takes 64 rows (8 warps of 8 rows) and a range of column tiles: the columns
        // are split over blockIdx.y so that a small projection still fills every SM (the work is as much fp32 FMA as W0
        // reading, so idle SMs cost as much as a slow read). A tile is 32 vectors of N columns (lane = vector); a lane holds
        // V of its warp's 8 rows × N columns in fp32 registers: W's values, plus the rank updates, then squared into per-row
        // sums. Per step (one tile, one chunk of 16 ranks) the block stages the chunk's A tile in shared memory in fp32
        // (as[k][column]: a lane reads its N columns in one conflict-free vector read) and s·B of its rows transposed
        // (bs[k][row]: one broadcast read gives 4 rows' factors), so every A value read serves 8 rows and every B value
        // N columns. The next step's A and B values (raw and unconditionally: an index outside the tensors reads element 0
        // and a validity bit zeroes it when staged) and the next tile's W (predicated: zeros outside) are loaded into
        // registers while this step computes; two blocks per SM (128 registers a thread) hide the rest of the latency.
        // Split columns: each block writes its rows' partial sums; the block that finishes a row range last (a ticket per
        // 64 rows, reset by that block) adds the partials in split order and writes the norms: one launch, deterministic.
        #define LH_LR_THREADS 256
        #define LH_LR_WARPS 8
        #define LH_LR_ROWS 8
        #define LH_LR_BR 64
        #define LH_LR_KC 16

        // The raw A and B values thread `tid` stages for the step (tile, chunk): vector e = i·THREADS + tid (N columns) of the
        // chunk's KC × TILE slice of A (row-major) and element e of its KC × BR slice of Bᵀ; bit i (A) and SA + i (B) of
        // `valid` say which are inside.
        template <typename TA, int N, int SA, int SB>
        __device__ __forceinline__ void lr_load_ab(Pack<TA, N> (&ra)[SA], TA (&rb)[SB], u32& valid, const TA* __restrict__ a,
                                                   const TA* __restrict__ b, i64 tile, int chunk, i64 block_row, i64 rows,
                                                   i64 cols, int rank, int tid) {
          const int k0 = chunk * LH_LR_KC;
          valid = 0;
        #pragma unroll
          for (int i = 0; i < SA; i++) {
            const int e = i * LH_LR_THREADS + tid;
            const int k = e / 32, c = e % 32;
            const i64 vc = tile * 32 + c;  // A's vector of N columns
            const bool ok = k0 + k < rank && vc * N < cols;
            ra[i] = load_pack<TA, N>(a + (ok ? static_cast<i64>(k0 + k) * cols : 0), ok ? vc : 0);
            valid |= static_cast<u32>(ok) << i;
          }
        #pragma unroll
          for (int i = 0; i < SB; i++) {
            const int e = i * LH_LR_THREADS + tid;
            const int k = e / LH_LR_BR, q = e % LH_LR_BR;
            const i64 row = block_row + q;
            const bool ok = k0 + k < rank && row < rows;
            rb[i] = b[ok ? row * rank + k0 + k : 0];
            valid |= static_cast<u32>(ok) << (SA + i);
          }
        }

        // W of the warp's rows for a tile: the lane's vector of N columns per row, zeros outside W (predicated loads).
        template <typename T, int N>
        __device__ __forceinline__ void lr_load_w(Pack<T, N> (&rw)[LH_LR_ROWS], const T* __restrict__ w, i64 tile, i64 warp_row,
                                                  int lane, i64 rows, i64 cols, i64 nvec) {
          const i64 vc = tile * 32 + lane;
          const bool col_ok = vc < nvec;
          // One 64-bit base, rows 32-bit apart (the launcher checks LH_LR_ROWS · cols < 2³¹): fewer live registers.
          const Pack<T, N>* base = reinterpret_cast<const Pack<T, N>*>(w + (col_ok && warp_row < rows ? warp_row * cols : 0)) + (col_ok ? vc : 0);
          const u32 stride = static_cast<u32>(cols / N);
        #pragma unroll
          for (int q = 0; q < LH_LR_ROWS; q++) {
            if (warp_row + q < rows && col_ok) {
              rw[q] = base[q * stride];
            } else {
        #pragma unroll
              for (int n = 0; n < N; n++) rw[q].v[n] = Cvt<T>::from(0.f);
            }
          }
        }

        // The loaded A values into the shared A tile in fp32 (zeros where the validity bits say outside), and s·B likewise.
        template <typename TA, int N, int SA>
        __device__ __forceinline__ void lr_stage_a(float (*as)[32 * N], const Pack<TA, N> (&ra)[SA], u32 valid, int tid) {
        #pragma unroll
          for (int i = 0; i < SA; i++) {
            const int e = i * LH_LR_THREADS + tid;
            const bool ok = (valid >> i) & 1u;
            Pack<float, N> p;
        #pragma unroll
            for (int n = 0; n < N; n++) p.v[n] = ok ? Cvt<TA>::to(ra[i].v[n]) : 0.f;
            *reinterpret_cast<Pack<float, N>*>(&as[e / 32][(e % 32) * N]) = p;
          }
        }

        template <typename TA, int SA, int SB>
        __device__ __forceinline__ void lr_stage_b(float (*bs)[LH_LR_BR], const TA (&rb)[SB], u32 valid, float s, int tid) {
        #pragma unroll
          for (int i = 0; i < SB; i++) {
            const int e = i * LH_LR_THREADS + tid;
            bs[e / LH_LR_BR][e % LH_LR_BR] = (valid >> (SA + i)) & 1u ? s * Cvt<TA>::to(rb[i]) : 0.f;
          }
        }

        // v[q][n] += Σ_k s·B[q][k]·A[k][lane's column n] over the chunk's 16 ranks (in a partial last chunk the staged A and
        // B of the ranks past r are 0, and fmaf(0, 0, v) is v).
        template <int N>
        __device__ __forceinline__ void lr_chunk_fma(float (&v)[LH_LR_ROWS][N], float (*as)[32 * N], float (*bs)[LH_LR_BR],
                                                     int warp, int lane) {
        #pragma unroll
          for (int k = 0; k < LH_LR_KC; k++) {
            const Pack<float, N> av = *reinterpret_cast<const Pack<float, N>*>(&as[k][lane * N]);
            float bv[LH_LR_ROWS];
        #pragma unroll
            for (int g = 0; g < LH_LR_ROWS / 4; g++) {
              const Pack<float, 4> p = *reinterpret_cast<const Pack<float, 4>*>(&bs[k][warp * LH_LR_ROWS + g * 4]);
        #pragma unroll
              for (int j = 0; j < 4; j++) bv[g * 4 + j] = p.v[j];
            }
        #pragma unroll
            for (int q = 0; q < LH_LR_ROWS; q++) {
        #pragma unroll
              for (int n = 0; n < N; n++) v[q][n] = fmaf(bv[q], av.v[n], v[q][n]);
            }
          }
        }

        // ‖V_row‖ from its sum of squares into out, and with m the row scale c = m/‖V‖ (IEEE division, as torch's div).
        template <typename TA>
        __device__ __forceinline__ void lr_store(float* __restrict__ out, const TA* __restrict__ m, float* __restrict__ c, i64 row,
                                                 float sumsq) {
          const float norm = sqrtf(sumsq);
          out[row] = norm;
          if (c != nullptr) c[row] = Cvt<TA>::to(m[row]) / norm;
        }

        // The block (bx, by) of a grid of gy column splits (the plain kernel passes blockIdx.x, blockIdx.y, gridDim.y; the
        // grouped one its item's row block, 0, 1). m, c: null, or the magnitude and the row scale to write (lr_store).
        template <typename T, typename TA, int N>
        __device__ __forceinline__ void lowrank_norms(const T* __restrict__ w, const TA* __restrict__ a, const TA* __restrict__ b,
                                                      float s, float* __restrict__ out, const TA* __restrict__ m,
                                                      float* __restrict__ c, float* __restrict__ partial,
                                                      u32* __restrict__ tickets, i64 rows, i64 cols, int rank,
                                                      i64 tiles_per_split, i64 bx, i64 by, u32 gy) {
          constexpr int TILE = 32 * N;                                   // columns per tile
          constexpr int SA = LH_LR_KC * 32 / LH_LR_THREADS;              // A vectors each thread stages per step
          constexpr int SB = LH_LR_KC * LH_LR_BR / LH_LR_THREADS;        // B values each thread stages per step
          __shared__ Pack<float, 4> as_storage[LH_LR_KC * TILE / 4];
          __shared__ Pack<float, 4> bs_storage[LH_LR_KC * LH_LR_BR / 4];
          __shared__ u32 last_block;
          float (*as)[TILE] = reinterpret_cast<float (*)[TILE]>(as_storage);
          float (*bs)[LH_LR_BR] = reinterpret_cast<float (*)[LH_LR_BR]>(bs_storage);
          const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
          const i64 block_row = bx * LH_LR_BR;
          const i64 warp_row = block_row + warp * LH_LR_ROWS;
          const i64 nvec = cols / N;
          const i64 ntiles = (nvec + 31) / 32;
          const i64 tile_begin = by * tiles_per_split;
          const i64 tile_end = tile_begin + tiles_per_split < ntiles ? tile_begin + tiles_per_split : ntiles;
          const int nchunks = (rank + LH_LR_KC - 1) / LH_LR_KC;

          Pack<TA, N> ra[SA];         // the next step's A and B values, raw
          TA rb[SB];
          Pack<T, N> rw[LH_LR_ROWS];  // the next tile's W (zeros outside it)
          u32 valid_ab = 0;
          float ss[LH_LR_ROWS];
        #pragma unroll
          for (int q = 0; q < LH_LR_ROWS; q++) ss[q] = 0.f;
          if (tile_begin < tile_end) {
            lr_load_ab<TA, N, SA, SB>(ra, rb, valid_ab, a, b, tile_begin, 0, block_row, rows, cols, rank, tid);
            lr_load_w<T, N>(rw, w, tile_begin, warp_row, lane, rows, cols, nvec);
          }
          for (i64 tile = tile_begin; tile < tile_end; tile++) {
            float v[LH_LR_ROWS][N];
        #pragma unroll
            for (int q = 0; q < LH_LR_ROWS; q++) {
        #pragma unroll
              for (int n = 0; n < N; n++) v[q][n] = Cvt<T>::to(rw[q].v[n]);
            }
            if (tile + 1 < tile_end) lr_load_w<T, N>(rw, w, tile + 1, warp_row, lane, rows, cols, nvec);
            for (int chunk = 0; chunk < nchunks; chunk++) {
              __syncthreads();  // the previous step is done with the shared tiles
              lr_stage_a<TA, N, SA>(as, ra, valid_ab, tid);
              lr_stage_b<TA, SA, SB>(bs, rb, valid_ab, s, tid);
              __syncthreads();
              // The next step's A and B: in flight while this one computes.
              if (chunk + 1 < nchunks) lr_load_ab<TA, N, SA, SB>(ra, rb, valid_ab, a, b, tile, chunk + 1, block_row, rows, cols, rank, tid);
              else if (tile + 1 < tile_end) lr_load_ab<TA, N, SA, SB>(ra, rb, valid_ab, a, b, tile + 1, 0, block_row, rows, cols, rank, tid);
              lr_chunk_fma<N>(v, as, bs, warp, lane);
            }
        #pragma unroll
            for (int q = 0; q < LH_LR_ROWS; q++) {
        #pragma unroll
              for (int n = 0; n < N; n++) ss[q] = fmaf(v[q][n], v[q][n], ss[q]);
            }
          }
        #pragma unroll
          for (int q = 0; q < LH_LR_ROWS; q++) ss[q] = warp_sum(ss[q]);
          if (gy == 1) {
        #pragma unroll
            for (int q = 0; q < LH_LR_ROWS; q++) {
              if (lane == q && warp_row + q < rows) lr_store<TA>(out, m, c, warp_row + q, ss[q]);
            }
            return;
          }
        #pragma unroll
          for (int q = 0; q < LH_LR_ROWS; q++) {
            if (lane == q && warp_row + q < rows) partial[by * rows + warp_row + q] = ss[q];
          }
          __threadfence();  // the partials are visible device-wide before the ticket says so
          __syncthreads();
          if (tid == 0) last_block = atomicAdd(&tickets[bx], 1u) == gy - 1;
          __syncthreads();
          if (!last_block) return;
          __threadfence();
          if (tid < LH_LR_BR && block_row + tid < rows) {
            const volatile float* p = partial;
            float total = 0.f;
            for (u32 split = 0; split < gy; split++) total += p[static_cast<i64>(split) * rows + block_row + tid];
            lr_store<TA>(out, m, c, block_row + tid, total);
          }
          if (tid == 0) tickets[bx] = 0;  // ready for the next launch
        }

        // Columns per lane: vectors of 4 columns of W (v) or 1.
        #define LH_LR_N_1 1
        #define LH_LR_N_v 4

        """;

    private const string LowRankEntries = """
        // lh_lora_lowrank_norms_<W type>_<A, B type>_<v: vectors of 4 columns of W | 1>.
        #define LH_LOWRANK_ENTRY(T, S, TA, SA_, V)                                                                      \
          extern "C" __global__ void __launch_bounds__(LH_LR_THREADS, 2) lh_lora_lowrank_norms_##S##_##SA_##_##V(       \
              const T* w, const TA* a, const TA* b, float s, float* out, float* partial, u32* tickets, i64 rows,        \
              i64 cols, int rank, i64 tiles_per_split) { lh_grid_dependency_sync();                                                                \
            lowrank_norms<T, TA, LH_LR_N_##V>(w, a, b, s, out, nullptr, nullptr, partial, tickets, rows, cols, rank,     \
                                              tiles_per_split, blockIdx.x, blockIdx.y, gridDim.y);                     \
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
