using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// DoRA's low-rank norms of many projections (a whole model's) in one launch: <see cref="grouped_low_rank_row_norms"/>.
/// </summary>
public static partial class LoraWeightNorms
{
    /// <summary>
    /// One projection of <see cref="grouped_low_rank_row_norms"/>: W (rows × cols), A (r × cols), B (rows × r), s, and where
    /// to write ‖W_i + s·Σ_k B_ik·A_k‖ (<paramref name="Norm"/>: rows, fp32). With <paramref name="Magnitude"/> (rows, A's
    /// dtype) the row scale c = m/‖V‖ is written into <paramref name="Scale"/> (rows, fp32) too, IEEE-divided as torch's
    /// m.div(norm) gives it.
    /// </summary>
    public sealed record LowRankNormItem(Tensor W, Tensor A, Tensor B, double Scaling, Tensor Norm, Tensor? Magnitude = null, Tensor? Scale = null);

    /// <summary>
    /// Whether <see cref="grouped_low_rank_row_norms"/> may run (default on; LORAHUB_DORA_NORM_GROUPED=0: off, and DoRA
    /// computes each projection's norm by <see cref="low_rank_row_norms"/> as before).
    /// </summary>
    public static bool GroupedNorms { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_DORA_NORM_GROUPED")?.Trim() != "0";

    /// <summary>
    /// Whether groups of ranks up to 16 in vectors of 4 columns take the pipelined block code (its own program; s·B staged
    /// once per block, A double-buffered, W streamed through shared memory by cp.async several tiles ahead: one llama-1b
    /// step's 112 norms in 1.23 ms on an H200 against 1.81 ms for the plain block code and 2.43 ms for 112 per-projection
    /// launches) rather than the plain kernel's block code (<see cref="low_rank_row_norms"/> without column splits). Both
    /// take the same sums in the same order: the same bits. Default on; LORAHUB_DORA_GROUPED_PIPELINE=0: off.
    /// </summary>
    public static bool GroupedPipelined { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_DORA_GROUPED_PIPELINE")?.Trim() != "0";

    /// <summary>
    /// Whether a caller that runs a training step's norms as a group may run most of them on a side stream beside the
    /// first layers' forward (<see cref="GroupedNormLaunch.RunBeside"/>; DoRA does: its first layers' norms on libtorch's
    /// stream, the rest beside them). The same kernel and bits, another order on the GPU. Default off
    /// (LORAHUB_DORA_NORM_STREAM=1: on): on an H200 (llama-1b DoRA r16 4×2048, session 9) 85,220 and 85,158 tok/s beside
    /// against 82,599 (an outlier) and 85,046 in one call — no gain beyond noise; the norm kernel shares the SMs and
    /// memory bandwidth with the first layers' GEMMs.
    /// </summary>
    public static bool GroupedBeside { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_DORA_NORM_STREAM")?.Trim() == "1";

    private static long groupedLaunches, groupedItems;

    /// <summary>
    /// Launches of the grouped FMA kernels so far: one per kernel a group takes (a combination of dtypes and vector width);
    /// the GEMM path counts its chunks apart (<see cref="GroupedGemmChunks"/>).
    /// </summary>
    public static long GroupedNormLaunches => Interlocked.Read(ref groupedLaunches);

    /// <summary>Projections whose norms the grouped kernel computed so far (tests: a silent fallback must not pass).</summary>
    public static long GroupedNormItems => Interlocked.Read(ref groupedItems);

    private static readonly CudaProgram groupedProgram = new("lora_grouped_norms.cu", GroupedSource, dependentLaunch: true);
    private static readonly CudaProgram groupedPipeProgram = new("lora_grouped_norms_pipe.cu", GroupedPipeSource, dependentLaunch: true);

    // The pipelined block code's dynamic shared memory: 8 warps × stages × 8 rows × 32 lanes × one vector of 4 columns (4 stages of 8 bytes
    // for 16-bit W, 2 of 16 for fp32): 64 KiB, allowed per kernel once.
    private const int PipeSharedBytes = 64 * 1024;

    /// <summary>NVRTC's message when the grouped kernel did not compile (null: it did, or was not tried).</summary>
    public static string? GroupedCompileFailure => groupedProgram.CompileFailure;

    /// <summary>NVRTC's message when the pipelined block code (<see cref="GroupedPipelined"/>) did not compile (null: it did, or was not tried).</summary>
    public static string? GroupedPipeCompileFailure => groupedPipeProgram.CompileFailure;

    // The int64 words of one item in the kernel's LhNormItem (80 bytes).
    private const int ItemWords = 10;

    /// <summary>Whether <paramref name="item"/> fits the grouped kernel (the layouts <see cref="low_rank_row_norms"/> takes, and outputs as described).</summary>
    public static bool GroupedApplies(LowRankNormItem item)
    {
        var (w, a, b) = (item.W, item.A, item.B);
        if (!Usable(w) || w.dim() != 2 || a.dim() != 2 || b.dim() != 2) return false;
        long rows = w.size(0), cols = w.size(1), rank = a.size(0);
        if (rows == 0 || rank == 0 || rank > int.MaxValue || a.size(1) != cols || b.size(0) != rows || b.size(1) != rank
            || cols >= int.MaxValue / 8 || !Supported(a.dtype) || b.dtype != a.dtype || !torchx.same_device(a, w)
            || !torchx.same_device(b, w) || !w.is_contiguous() || !a.is_contiguous() || !b.is_contiguous()
            || !IsRowVector(item.Norm, ScalarType.Float32, w))
            return false;
        if (item.Magnitude is null != item.Scale is null) return false;
        return item.Magnitude is null || IsRowVector(item.Magnitude, a.dtype, w) && IsRowVector(item.Scale!, ScalarType.Float32, w);
    }

    private static bool IsRowVector(Tensor t, ScalarType dtype, Tensor w) =>
        t.dtype == dtype && t.dim() == 1 && t.size(0) == w.size(0) && t.is_contiguous() && torchx.same_device(t, w);

    /// <summary>
    /// The norms (and row scales) of every item in one launch per combination of W's and A's dtypes and vector width
    /// (usually one): a block takes 64 rows of one item and all its columns, exactly as <see cref="low_rank_row_norms"/>
    /// computes them without column splits (so the bits may differ from that kernel's in the last place; those of one
    /// item do not depend on the others); with <see cref="GroupedGemm"/> (the default) the items that fit it take cuBLAS
    /// GEMMs instead: one launch for all of them, then a GEMM and a launch per chunk of items of one shape (within fp32
    /// rounding of these). False, and nothing launched, when the switch is off, an item does not fit
    /// (<see cref="GroupedApplies"/>), the items are on several devices or the kernel did not compile: the caller then
    /// computes them otherwise. Not differentiable. A caller that computes the same items again and again (DoRA, every
    /// training step) prepares them once instead (<see cref="prepare_grouped_low_rank_row_norms"/>).
    /// </summary>
    public static bool grouped_low_rank_row_norms(IReadOnlyList<LowRankNormItem> items)
    {
        using var launch = prepare_grouped_low_rank_row_norms(items);
        return launch?.Run() ?? false;
    }

    /// <summary>
    /// <see cref="grouped_low_rank_row_norms"/> checked and laid out once (the item table uploaded to the device), to run
    /// again with <see cref="GroupedNormLaunch.Run"/> for as long as the items' tensors stay where and what they are. A, B
    /// and m may change values (they are read at each run); W may not where the GEMM path takes it (its ‖W_i‖² is taken
    /// here): prepare again after writing a base weight. Null where the grouped kernel does not apply. Dispose frees the
    /// tables and workspace.
    /// </summary>
    public static GroupedNormLaunch? prepare_grouped_low_rank_row_norms(IReadOnlyList<LowRankNormItem> items)
    {
        if (!GroupedNorms || !LowRankNormKernel || !LoraRowScaleKernels.Enabled || items.Count == 0) return null;
        var device = DeviceIndex(items[0].W);
        foreach (var item in items)
            if (!GroupedApplies(item) || !torchx.same_device(item.W, items[0].W)) return null;
        if (!groupedProgram.Compiles(device, "DoRA's norms are computed per projection")) return null;
        var launches = new List<Bucket>();
        // The items the GEMM path takes (none where it is off or cannot run here; each fits the grouped kernel, checked
        // above); the FMA kernels take the rest.
        var fits = GroupedGemm ? items.Where(GemmFits).ToList() : [];
        var gemm = PrepareGemm(fits, device);
        var taken = gemm is null ? [] : fits.ToHashSet(ReferenceEqualityComparer.Instance);
        var rest = items.Where(i => !taken.Contains(i)).ToList();
        foreach (var bucket in rest.GroupBy(i => $"{Suffix(i.W.dtype)}_{Suffix(i.A.dtype)}_{(Vectorized(i) ? "v" : "1")}"))
        {
            // Items with more columns (longer blocks) first: the grid's last wave is then made of short blocks.
            var ordered = bucket.OrderByDescending(i => i.W.size(1)).ToList();
            var words = new long[ordered.Count * ItemWords];
            long blocks = 0;
            for (var k = 0; k < ordered.Count; k++)
            {
                var it = ordered[k];
                var o = k * ItemWords;
                words[o] = (long)Ptr(it.W);
                words[o + 1] = (long)Ptr(it.A);
                words[o + 2] = (long)Ptr(it.B);
                words[o + 3] = it.Magnitude is null ? 0 : (long)Ptr(it.Magnitude);
                words[o + 4] = (long)Ptr(it.Norm);
                words[o + 5] = it.Scale is null ? 0 : (long)Ptr(it.Scale);
                words[o + 6] = it.W.size(0);
                words[o + 7] = it.W.size(1);
                words[o + 8] = blocks;
                // float s in the low half, int rank in the high half (little-endian: the struct's s, then rank).
                words[o + 9] = (long)(uint)BitConverter.SingleToInt32Bits((float)it.Scaling) | it.A.size(0) << 32;
                blocks += (it.W.size(0) + LowRankBlockRows - 1) / LowRankBlockRows;
            }
            using var host = tensor(words);
            var table = host.to(items[0].W.device).DetachFromDisposeScope();
            // Ranks up to 16 (one chunk) in vectors of 4 columns take the pipelined block code (the same bits; GroupedPipelined).
            var pipe = GroupedPipelined && bucket.Key.EndsWith("_v") && ordered.All(i => i.A.size(0) <= 16)
                && groupedPipeProgram.Compiles(device, "the plain block code runs instead");
            var kernel = pipe ? $"lh_lora_grouped_norms16p_{bucket.Key}" : $"lh_lora_grouped_norms_{bucket.Key}";
            var function = (pipe ? groupedPipeProgram : groupedProgram).Function(device, kernel);
            if (pipe) function.AllowDynamicSharedMemory(PipeSharedBytes);
            launches.Add(new Bucket(function, checked((int)blocks), pipe ? PipeSharedBytes : 0, ordered.Count, table));
        }
        return new GroupedNormLaunch(launches, gemm, items.Count, device);
    }

    // One launch of a prepared group: its kernel, grid, dynamic shared memory, items and item table.
    internal sealed record Bucket(CudaFunction Function, int Blocks, int Shared, int Count, Tensor Table);

    /// <summary>A prepared <see cref="grouped_low_rank_row_norms"/> (<see cref="prepare_grouped_low_rank_row_norms"/>).</summary>
    public sealed class GroupedNormLaunch : IDisposable
    {
        private readonly List<Bucket> launches;
        private readonly GemmPlan? gemm;
        private readonly int device;

        internal GroupedNormLaunch(List<Bucket> launches, GemmPlan? gemm, int items, int device)
        {
            this.launches = launches;
            this.gemm = gemm;
            this.device = device;
            Items = items;
        }

        /// <summary>How many projections a run computes.</summary>
        public int Items { get; }

        /// <summary>
        /// Launches the kernels (the items' current values); false, and nothing launched, when the switches turned the
        /// grouped kernel off since it was prepared.
        /// </summary>
        public bool Run() => Run(CudaDriver.LegacyStream);

        /// <summary>Whether <see cref="RunBeside"/> can run here (CUDA streams through the driver).</summary>
        public static bool BesideAvailable => CudaStreams.UnavailableReason is null;

        /// <summary>
        /// Launches the kernels on a side stream (<see cref="CudaStreams.ComputeStream"/>) after everything enqueued on
        /// libtorch's stream so far, so that they run beside the compute enqueued after them; libtorch's stream waits for
        /// them only at <see cref="BesideRun.Join"/>, which must come before anything reads the norms or writes the items'
        /// tensors (and before this launch is disposed). Null, and nothing launched, as for <see cref="Run()"/>.
        /// </summary>
        public BesideRun? RunBeside()
        {
            var side = CudaStreams.ComputeStream(device);
            CudaStreams.After(device, side, CudaDriver.LegacyStream);
            return Run(side) ? new BesideRun(device, CudaStreams.RecordEvent(device, side)) : null;
        }

        private bool Run(IntPtr stream)
        {
            if (!GroupedNorms || !LowRankNormKernel || !LoraRowScaleKernels.Enabled) return false;
            foreach (var b in launches)
            {
                b.Function.Launch(b.Blocks, LowRankThreads, b.Shared, new KernelArgs().Ptr(Ptr(b.Table)).I32(b.Count), stream);
                Interlocked.Increment(ref groupedLaunches);
            }
            gemm?.Run(device, stream);
            Interlocked.Add(ref groupedItems, Items);
            return true;
        }

        /// <summary>A <see cref="RunBeside"/> launch in flight on the side stream.</summary>
        public sealed class BesideRun(int device, IntPtr done)
        {
            private IntPtr done = done;

            /// <summary>Makes libtorch's stream wait (on the GPU, the host does not block) for the launch; once.</summary>
            public void Join()
            {
                var e = Interlocked.Exchange(ref done, IntPtr.Zero);
                if (e == IntPtr.Zero) return;
                CudaStreams.Wait(device, CudaDriver.LegacyStream, e);
                CudaStreams.DestroyEvent(device, e);
            }
        }

        /// <summary>Frees the item tables and workspace (kernels run in order on the stream: after the launches that read them).</summary>
        public void Dispose()
        {
            foreach (var l in launches) l.Table.Dispose();
            launches.Clear();
            gemm?.Dispose();
        }
    }

    // Vectors of 4 columns of W and A (each row then starts aligned too), as low_rank_row_norms decides.
    private static bool Vectorized(LowRankNormItem i) =>
        i.W.size(1) % LowRankVector == 0 && (long)Ptr(i.W) % (LowRankVector * i.W.ElementSize) == 0
        && (long)Ptr(i.A) % (LowRankVector * i.A.ElementSize) == 0;

    // The grouped kernel: blockIdx.x finds its item (binary search over the items' first blocks, in grid order) and runs
    // the plain kernel's block code for that item's 64-row block over all its columns (no column splits: the grid holds
    // every projection's row blocks, enough to fill the GPU many times over).
    private const string GroupedSource = """
        #include "lh_common.cuh"

        """ + LowRankDevice + GroupedCommon + GroupedEntries;

    // The pipelined block code apart (lora_grouped_norms_pipe.cu: inline PTX for cp.async; a failure there turns off only it).
    private const string GroupedPipeSource = """
        #include "lh_common.cuh"

        """ + LowRankDevice + GroupedCommon + GroupedPipeEntries;

    private const string GroupedCommon = """
        // One item (LoraWeightNorms.grouped_low_rank_row_norms writes this layout: 10 int64 words).
        struct LhNormItem {
          const void* w;
          const void* a;
          const void* b;
          const void* m;     // the magnitude (A's type), or null: no row scale
          float* norm;
          float* c;          // c = m/‖V‖, or null
          i64 rows;
          i64 cols;
          i64 first_block;   // the item's first block in the grid (items in grid order)
          float s;
          int rank;
        };

        // The item whose blocks hold this block: the last one whose first block is at most blockIdx.x.
        __device__ __forceinline__ int lh_item_of_block(const LhNormItem* __restrict__ items, int count) {
          const i64 block = blockIdx.x;
          int lo = 0, hi = count - 1;
          while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (items[mid].first_block <= block) lo = mid;
            else hi = mid - 1;
          }
          return lo;
        }

        """;

    private const string GroupedEntries = """
        template <typename T, typename TA, int N>
        __device__ __forceinline__ void grouped_lowrank_norms(const LhNormItem* __restrict__ items, int count) {
          const LhNormItem it = items[lh_item_of_block(items, count)];
          const i64 tiles = (it.cols / N + 31) / 32;
          lowrank_norms<T, TA, N>(static_cast<const T*>(it.w), static_cast<const TA*>(it.a), static_cast<const TA*>(it.b), it.s,
                                  it.norm, static_cast<const TA*>(it.m), it.c, nullptr, nullptr, it.rows, it.cols, it.rank, tiles,
                                  blockIdx.x - it.first_block, 0, 1u);
        }


        // lh_lora_grouped_norms_<W type>_<A, B, m type>_<v: vectors of 4 columns of W | 1>.
        #define LH_GROUPED_ENTRY(T, S, TA, SA_, V)                                                                      \
          extern "C" __global__ void __launch_bounds__(LH_LR_THREADS, 2) lh_lora_grouped_norms_##S##_##SA_##_##V(       \
              const LhNormItem* items, int count) { lh_grid_dependency_sync();                                                                     \
            grouped_lowrank_norms<T, TA, LH_LR_N_##V>(items, count);                                                    \
          }
        #define LH_GROUPED_ENTRIES(T, S)                                                                                 \
          LH_GROUPED_ENTRY(T, S, float, f32, 1) LH_GROUPED_ENTRY(T, S, float, f32, v)                                     \
          LH_GROUPED_ENTRY(T, S, f16, f16, 1) LH_GROUPED_ENTRY(T, S, f16, f16, v)                                         \
          LH_GROUPED_ENTRY(T, S, bf16, bf16, 1) LH_GROUPED_ENTRY(T, S, bf16, bf16, v)

        LH_GROUPED_ENTRIES(float, f32)
        LH_GROUPED_ENTRIES(f16, f16)
        LH_GROUPED_ENTRIES(bf16, bf16)
        """;

    // The pipelined block code, for rank ≤ 16 (one chunk of ranks) without column splits: s·B of the block's rows is staged
    // once (it is the same for every tile); A's tiles are double-buffered in shared memory, the next one stored after this
    // one's FMAs (its loads in flight meanwhile), so a tile takes one barrier instead of the plain code's two; and W is
    // streamed through shared memory by cp.async, LH_LR_STAGES − 1 tiles ahead of the one computed (its reads stay in
    // flight during the FMAs without registers held for them; the plain code prefetches one tile in registers). A lane
    // copies, then reads back, only its own W slots (slot (warp, stage, row, lane): a warp's 32 lanes read one row's 32
    // vectors from consecutive addresses, no bank conflict), so W needs no barrier. Vectors of 4 columns only (a copy is 8
    // or 16 bytes). The same sums in the same order as lowrank_norms: the same bits.
    private const string GroupedPipeEntries = """
        #define LH_LR_STAGES(T) (sizeof(T) == 4 ? 2 : 4)

        extern __shared__ unsigned char lr_w_stages[];

        __device__ __forceinline__ u32 lr_shared_address(const void* p) {
          u32 a;
          asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
          return a;
        }

        // This lane's vectors of W for its warp's rows at `tile` into stage slot `stage` of the warp's region at `region`
        // (zeros outside W: nothing read), as one commit group.
        template <typename T, int N>
        __device__ __forceinline__ void lr_copy_w(u32 region, const T* __restrict__ w, i64 tile, int stage, i64 warp_row, int lane,
                                                  i64 rows, i64 cols, i64 nvec) {
          constexpr int CP = static_cast<int>(sizeof(T)) * N;
          const i64 vc = tile * 32 + lane;
          const bool col_ok = vc < nvec;
        #pragma unroll
          for (int q = 0; q < LH_LR_ROWS; q++) {
            const bool in = col_ok && warp_row + q < rows;
            const T* src = in ? w + (warp_row + q) * cols + vc * N : w;
            const u32 dst = region + static_cast<u32>(((stage * LH_LR_ROWS + q) * 32 + lane) * CP);
            asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(dst), "l"(src), "n"(CP), "r"(in ? CP : 0) : "memory");
          }
          asm volatile("cp.async.commit_group;" ::: "memory");
        }

        template <typename T, typename TA, int N>
        __device__ __forceinline__ void lowrank_norms_r16_pipe(const T* __restrict__ w, const TA* __restrict__ a,
                                                               const TA* __restrict__ b, float s, float* __restrict__ out,
                                                               const TA* __restrict__ m, float* __restrict__ c, i64 rows, i64 cols,
                                                               int rank, i64 bx) {
          constexpr int TILE = 32 * N;
          constexpr int S = LH_LR_STAGES(T);
          constexpr int CP = static_cast<int>(sizeof(T)) * N;
          constexpr int SA = LH_LR_KC * 32 / LH_LR_THREADS;
          constexpr int SB = LH_LR_KC * LH_LR_BR / LH_LR_THREADS;
          constexpr int AS = LH_LR_KC * TILE / 4;
          __shared__ Pack<float, 4> as_storage[2 * AS];
          __shared__ Pack<float, 4> bs_storage[LH_LR_KC * LH_LR_BR / 4];
          float (*bs)[LH_LR_BR] = reinterpret_cast<float (*)[LH_LR_BR]>(bs_storage);
          const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
          const i64 block_row = bx * LH_LR_BR;
          const i64 warp_row = block_row + warp * LH_LR_ROWS;
          const i64 nvec = cols / N;
          const i64 ntiles = (nvec + 31) / 32;
          // The warp's region of the stages: S × LH_LR_ROWS × 32 slots of CP bytes.
          const unsigned char* mine = lr_w_stages + warp * (S * LH_LR_ROWS * 32 * CP);
          const u32 region = lr_shared_address(mine);

          Pack<TA, N> ra[SA];
          TA rb[SB];
          u32 valid = 0;
          float ss[LH_LR_ROWS];
        #pragma unroll
          for (int q = 0; q < LH_LR_ROWS; q++) ss[q] = 0.f;
        #pragma unroll
          for (int t = 0; t < S - 1; t++) {
            if (t < ntiles) lr_copy_w<T, N>(region, w, t, t, warp_row, lane, rows, cols, nvec);
            else asm volatile("cp.async.commit_group;" ::: "memory");
          }
          lr_load_ab<TA, N, SA, SB>(ra, rb, valid, a, b, 0, 0, block_row, rows, cols, rank, tid);
          lr_stage_b<TA, SA, SB>(bs, rb, valid, s, tid);
          lr_stage_a<TA, N, SA>(reinterpret_cast<float (*)[TILE]>(as_storage), ra, valid, tid);
          __syncthreads();
          for (i64 tile = 0; tile < ntiles; tile++) {
            float (*as)[TILE] = reinterpret_cast<float (*)[TILE]>(as_storage + (tile & 1) * AS);
            // The copies for tile + S − 1 (an empty group past the end keeps the count per tile), then this tile's are done.
            if (tile + S - 1 < ntiles) lr_copy_w<T, N>(region, w, tile + S - 1, static_cast<int>((tile + S - 1) % S), warp_row, lane, rows, cols, nvec);
            else asm volatile("cp.async.commit_group;" ::: "memory");
            asm volatile("cp.async.wait_group %0;" ::"n"(S - 1) : "memory");
            const int stage = static_cast<int>(tile % S);
            float v[LH_LR_ROWS][N];
        #pragma unroll
            for (int q = 0; q < LH_LR_ROWS; q++) {
              const Pack<T, N> p = *reinterpret_cast<const Pack<T, N>*>(mine + ((stage * LH_LR_ROWS + q) * 32 + lane) * CP);
        #pragma unroll
              for (int n = 0; n < N; n++) v[q][n] = Cvt<T>::to(p.v[n]);
            }
            const bool more = tile + 1 < ntiles;
            if (more) lr_load_ab<TA, N, SA, SB>(ra, rb, valid, a, b, tile + 1, 0, block_row, rows, cols, rank, tid);
            lr_chunk_fma<N>(v, as, bs, warp, lane);
        #pragma unroll
            for (int q = 0; q < LH_LR_ROWS; q++) {
        #pragma unroll
              for (int n = 0; n < N; n++) ss[q] = fmaf(v[q][n], v[q][n], ss[q]);
            }
            if (more) lr_stage_a<TA, N, SA>(reinterpret_cast<float (*)[TILE]>(as_storage + ((tile + 1) & 1) * AS), ra, valid, tid);
            __syncthreads();
          }
          asm volatile("cp.async.wait_group 0;" ::: "memory");
        #pragma unroll
          for (int q = 0; q < LH_LR_ROWS; q++) ss[q] = warp_sum(ss[q]);
        #pragma unroll
          for (int q = 0; q < LH_LR_ROWS; q++) {
            if (lane == q && warp_row + q < rows) lr_store<TA>(out, m, c, warp_row + q, ss[q]);
          }
        }

        // lh_lora_grouped_norms16p_<W type>_<A, B, m type>_v: vectors of 4 columns only.
        #define LH_PIPE_ENTRY(T, S_, TA, SA_)                                                                            \
          extern "C" __global__ void __launch_bounds__(LH_LR_THREADS, 2) lh_lora_grouped_norms16p_##S_##_##SA_##_v(      \
              const LhNormItem* items, int count) { lh_grid_dependency_sync();                                                                     \
            const LhNormItem it = items[lh_item_of_block(items, count)];                                                \
            lowrank_norms_r16_pipe<T, TA, LH_LR_N_v>(static_cast<const T*>(it.w), static_cast<const TA*>(it.a),         \
                                                     static_cast<const TA*>(it.b), it.s, it.norm,                       \
                                                     static_cast<const TA*>(it.m), it.c, it.rows, it.cols, it.rank,      \
                                                     blockIdx.x - it.first_block);                                      \
          }
        #define LH_PIPE_ENTRIES(T, S_)                                                                                   \
          LH_PIPE_ENTRY(T, S_, float, f32) LH_PIPE_ENTRY(T, S_, f16, f16) LH_PIPE_ENTRY(T, S_, bf16, bf16)

        LH_PIPE_ENTRIES(float, f32)
        LH_PIPE_ENTRIES(f16, f16)
        LH_PIPE_ENTRIES(bf16, bf16)
        """;
}
