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

    /// <summary>
    /// Whether groups take the tensor-core kernel where an item fits it (<see cref="TensorCoreApplies"/>: bf16 W, fp32 A,
    /// B and m, rank ≤ 16, columns a multiple of 32, 16-byte aligned rows): ‖V_i‖² = ‖W_i‖² + 2s·B_i·(W·Aᵀ)_i +
    /// s²·B_i·(A·Aᵀ)·B_iᵀ, with W·Aᵀ (A split into bf16 high and low parts, fp32 accumulation), ‖W_i‖² (the diagonal of
    /// W·Wᵀ) and A·Aᵀ from mma over one read of W: a few instructions per element of W where the FMA kernels take
    /// seventeen (their Nsight Compute profile: issue-bound, 69% of issue slots, 27% of DRAM bandwidth). The same norms
    /// within fp32 rounding, not the FMA kernels' bits. Default off (LORAHUB_DORA_NORM_TC=1: on): on an H200 one llama-1b
    /// step's 112 norms took 1,406 µs against 1,234 for the pipelined FMA kernel (session 13, call G), while the DoRA
    /// step ran at 87,805 and 87,386 tok/s with it against 86,586 without (one pair, within the noise of other calls).
    /// Settable at run time; a prepared launch keeps the kernel it was prepared with.
    /// </summary>
    public static bool GroupedTensorCores { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_DORA_NORM_TC")?.Trim() == "1";

    private static long groupedLaunches, groupedItems, tensorCoreItems;

    /// <summary>Projections whose norms the tensor-core kernel computed so far (<see cref="GroupedTensorCores"/>).</summary>
    public static long GroupedTensorCoreItems => Interlocked.Read(ref tensorCoreItems);

    /// <summary>
    /// Launches of the grouped kernel so far: one per kernel a group takes (a combination of dtypes and vector width, or
    /// the tensor-core kernel).
    /// </summary>
    public static long GroupedNormLaunches => Interlocked.Read(ref groupedLaunches);

    /// <summary>Projections whose norms the grouped kernel computed so far (tests: a silent fallback must not pass).</summary>
    public static long GroupedNormItems => Interlocked.Read(ref groupedItems);

    private static readonly CudaProgram groupedProgram = new("lora_grouped_norms.cu", GroupedSource, dependentLaunch: true);
    private static readonly CudaProgram groupedPipeProgram = new("lora_grouped_norms_pipe.cu", GroupedPipeSource, dependentLaunch: true);
    private static readonly CudaProgram groupedTcProgram = new("lora_grouped_norms_tc.cu", GroupedTcSource, dependentLaunch: true);

    // The tensor-core kernel's layout (LH_TC_ROWS, LH_TC_STAGES, LH_TC_AST in its source; a test holds them equal): rows a
    // block takes (8 warps of one 16-row mma tile), cp.async stages, A's staged row stride in floats; its dynamic shared
    // memory: the stages of W (rows × 64 columns, bf16) and of A (16 × stride fp32), the fragment words (1,024), the
    // Gram partials (8 × 128) and G (16 × 17): 72,256 bytes, three blocks a multiprocessor.
    internal const int TcBlockRows = 128, TcStages = 3, TcAStride = 72;
    private const int TcSharedBytes = TcStages * (TcBlockRows * 128 + 16 * TcAStride * 4) + 1024 * 4 + 8 * 128 * 4 + 16 * 17 * 4;

    // The pipelined block code's dynamic shared memory: 8 warps × stages × 8 rows × 32 lanes × one vector of 4 columns (4 stages of 8 bytes
    // for 16-bit W, 2 of 16 for fp32): 64 KiB, allowed per kernel once.
    private const int PipeSharedBytes = 64 * 1024;

    /// <summary>NVRTC's message when the grouped kernel did not compile (null: it did, or was not tried).</summary>
    public static string? GroupedCompileFailure => groupedProgram.CompileFailure;

    /// <summary>NVRTC's message when the pipelined block code (<see cref="GroupedPipelined"/>) did not compile (null: it did, or was not tried).</summary>
    public static string? GroupedPipeCompileFailure => groupedPipeProgram.CompileFailure;

    /// <summary>NVRTC's message when the tensor-core kernel (<see cref="GroupedTensorCores"/>) did not compile (null: it did, or was not tried).</summary>
    public static string? GroupedTensorCoreCompileFailure => groupedTcProgram.CompileFailure;

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

    /// <summary>Whether a fitting item (<see cref="GroupedApplies"/>) can take the tensor-core kernel (<see cref="GroupedTensorCores"/>).</summary>
    public static bool TensorCoreApplies(LowRankNormItem item) =>
        GroupedApplies(item) && item.W.dtype == ScalarType.BFloat16 && item.A.dtype == ScalarType.Float32 && item.A.size(0) <= 16
        && item.W.size(1) % 32 == 0 && (long)Ptr(item.W) % 16 == 0 && (long)Ptr(item.A) % 16 == 0
        && CudaKernels.ComputeCapability(DeviceIndex(item.W)) >= 80;

    private static bool IsRowVector(Tensor t, ScalarType dtype, Tensor w) =>
        t.dtype == dtype && t.dim() == 1 && t.size(0) == w.size(0) && t.is_contiguous() && torchx.same_device(t, w);

    /// <summary>
    /// The norms (and row scales) of every item in one launch per combination of W's and A's dtypes and vector width
    /// (usually one): a block takes 64 rows of one item and all its columns, exactly as <see cref="low_rank_row_norms"/>
    /// computes them without column splits (so the bits may differ from that kernel's in the last place; those of one
    /// item do not depend on the others); with <see cref="GroupedTensorCores"/> the items that fit it go to the tensor-core
    /// kernel instead (one launch more where others remain; within fp32 rounding of these). False, and nothing launched,
    /// when the switch is off, an item does not fit (<see cref="GroupedApplies"/>), the items are on several devices or
    /// the kernel did not compile: the caller then computes them otherwise. Not differentiable. A caller that computes
    /// the same items again and again (DoRA, every training step) prepares them once instead
    /// (<see cref="prepare_grouped_low_rank_row_norms"/>).
    /// </summary>
    public static bool grouped_low_rank_row_norms(IReadOnlyList<LowRankNormItem> items)
    {
        using var launch = prepare_grouped_low_rank_row_norms(items);
        return launch?.Run() ?? false;
    }

    /// <summary>
    /// <see cref="grouped_low_rank_row_norms"/> checked and laid out once (the item table uploaded to the device), to run
    /// again with <see cref="GroupedNormLaunch.Run"/> for as long as the items' tensors stay where and what they are (their
    /// values may change: they are read at each run); null where the grouped kernel does not apply. Dispose frees the table.
    /// </summary>
    public static GroupedNormLaunch? prepare_grouped_low_rank_row_norms(IReadOnlyList<LowRankNormItem> items)
    {
        if (!GroupedNorms || !LowRankNormKernel || !LoraRowScaleKernels.Enabled || items.Count == 0) return null;
        var device = DeviceIndex(items[0].W);
        foreach (var item in items)
            if (!GroupedApplies(item) || !torchx.same_device(item.W, items[0].W)) return null;
        if (!groupedProgram.Compiles(device, "DoRA's norms are computed per projection")) return null;
        var launches = new List<Bucket>();
        // The items the tensor-core kernel takes (none where it is off or did not compile).
        var tc = GroupedTensorCores ? items.Where(TensorCoreApplies).ToHashSet(ReferenceEqualityComparer.Instance) : [];
        if (tc.Count > 0 && !groupedTcProgram.Compiles(device, "the FMA kernels compute the norms")) tc.Clear();
        foreach (var bucket in items.GroupBy(i => tc.Contains(i) ? "tc" : $"{Suffix(i.W.dtype)}_{Suffix(i.A.dtype)}_{(Vectorized(i) ? "v" : "1")}"))
        {
            // Items with more columns (longer blocks) first: the grid's last wave is then made of short blocks.
            var ordered = bucket.OrderByDescending(i => i.W.size(1)).ToList();
            var blockRows = bucket.Key == "tc" ? TcBlockRows : LowRankBlockRows;
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
                blocks += (it.W.size(0) + blockRows - 1) / blockRows;
            }
            using var host = tensor(words);
            var table = host.to(items[0].W.device).DetachFromDisposeScope();
            if (bucket.Key == "tc")
            {
                var tcFunction = groupedTcProgram.Function(device, "lh_lora_grouped_norms_tc_bf16");
                tcFunction.AllowDynamicSharedMemory(TcSharedBytes);
                launches.Add(new Bucket(tcFunction, checked((int)blocks), TcSharedBytes, ordered.Count, table, TensorCores: true));
                continue;
            }
            // Ranks up to 16 (one chunk) in vectors of 4 columns take the pipelined block code (the same bits; GroupedPipelined).
            var pipe = GroupedPipelined && bucket.Key.EndsWith("_v") && ordered.All(i => i.A.size(0) <= 16)
                && groupedPipeProgram.Compiles(device, "the plain block code runs instead");
            var kernel = pipe ? $"lh_lora_grouped_norms16p_{bucket.Key}" : $"lh_lora_grouped_norms_{bucket.Key}";
            var function = (pipe ? groupedPipeProgram : groupedProgram).Function(device, kernel);
            if (pipe) function.AllowDynamicSharedMemory(PipeSharedBytes);
            launches.Add(new Bucket(function, checked((int)blocks), pipe ? PipeSharedBytes : 0, ordered.Count, table));
        }
        return new GroupedNormLaunch(launches, items.Count, device);
    }

    // One launch of a prepared group: its kernel, grid, dynamic shared memory, items and item table, and whether it is the
    // tensor-core kernel.
    internal sealed record Bucket(CudaFunction Function, int Blocks, int Shared, int Count, Tensor Table, bool TensorCores = false);

    /// <summary>A prepared <see cref="grouped_low_rank_row_norms"/> (<see cref="prepare_grouped_low_rank_row_norms"/>).</summary>
    public sealed class GroupedNormLaunch : IDisposable
    {
        private readonly List<Bucket> launches;
        private readonly int device;

        internal GroupedNormLaunch(List<Bucket> launches, int items, int device)
        {
            this.launches = launches;
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
                if (b.TensorCores) Interlocked.Add(ref tensorCoreItems, b.Count);
                Interlocked.Increment(ref groupedLaunches);
            }
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

        /// <summary>Frees the item tables (kernels run in order on the stream: after the launches that read them).</summary>
        public void Dispose()
        {
            foreach (var l in launches) l.Table.Dispose();
            launches.Clear();
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

    // The tensor-core kernel (GroupedTensorCores). A block takes 128 rows of one item (a 16-row mma tile a warp) and walks
    // the columns 64 at a time: W's chunk (128 rows × 128 bytes, whole lines) and A's (16 ranks × 64 columns, fp32, ranks
    // past r zero) are staged by cp.async two chunks ahead; W's 16-byte pieces are swizzled by row so that ldmatrix reads
    // its fragments without bank conflicts. Per chunk the block splits A into bf16 high and low parts (A = hi + lo within
    // 2⁻¹⁶) once, as the mma fragment words every warp reads. Per k-step: W·Aᵀ by two mma with the high part and two with
    // the low (W exact in bf16, fp32 accumulation), and W·Wᵀ of the tile's rows by two more (W's own fragments as the
    // column operand), whose diagonal ‖W_i‖² is added up in fp32 per chunk (the tensor cores' own accumulation over
    // thousands of columns drifts by ~1e-5). Warp w forms A·Aᵀ (hi·hi + hi·lo + lo·hi) for k-step w / 2 and n-tile w % 2
    // of every chunk; the partials are summed in warp order. The epilogue: per row Σ_k B_ik·(2s·P_ik + s²·(B_i·G)_k) over
    // the lane's four ranks, plus ‖W_i‖² where the lane holds it, summed over the row's four lanes; then ‖V_i‖ = √max(·, 0)
    // and c = m/‖V‖ as lr_store writes them.
    internal const string GroupedTcSource = """
        #include "lh_common.cuh"
        #include "lh_mma.cuh"

        """ + GroupedCommon + """
        // The bf16 high and low parts of x0, x1 as packed pairs (x0 in the low half): x ≈ hi + lo within 2⁻¹⁶ relative.
        __device__ __forceinline__ void lh_split_pair(float x0, float x1, u32& hi, u32& lo) {
          hi = lh_round_pair<bf16>(x0, x1);
          const float h0 = __uint_as_float(hi << 16), h1 = __uint_as_float(hi & 0xffff0000u);
          lo = lh_round_pair<bf16>(x0 - h0, x1 - h1);
        }

        #define LH_TC_ROWS 128
        #define LH_TC_STAGES 3
        #define LH_TC_AST 72  // A's staged row stride in floats: a warp's float2 reads of the split take two wavefronts
        #define LH_TC_W_BYTES (LH_TC_ROWS * 128)
        #define LH_TC_A_BYTES (16 * LH_TC_AST * 4)
        // A's fragment word (k-step ks, n-tile n, register reg, high or low part hl) of lane `lane` among the 1,024.
        #define LH_TC_WORD(ks, n, reg, hl, lane) (((((ks) * 2 + (n)) * 2 + (reg)) * 2 + (hl)) * 32 + (lane))

        extern __shared__ __align__(16) unsigned char lh_tc_smem[];

        // Chunk ch (64 columns) into stage st: W's 128 rows × 8 pieces of 16 bytes (4 a thread; piece p of row r at slot
        // p ^ (r & 7)), A's 16 rows × 16 float4 (1 a thread); zeros outside W and A; one commit group.
        __device__ __forceinline__ void lh_tc_copy(const u16* w, const float* a, i64 rows, i64 cols, int rank, i64 row0, i64 ch, int st,
                                                   int t) {
          unsigned char* ws = lh_tc_smem + st * LH_TC_W_BYTES;
          const i64 c0 = ch * 64;
        #pragma unroll
          for (int i = 0; i < 4; i++) {
            const int c = t + 256 * i, r = c >> 3, piece = c & 7;
            const i64 row = row0 + r, col = c0 + 8 * piece;
            const bool in = row < rows && col < cols;
            copy16_async(shared_address(ws + r * 128 + ((piece ^ (r & 7)) << 4)), w + (in ? row * cols + col : 0), in);
          }
          const int k = t >> 4, p4 = t & 15;
          const i64 col = c0 + 4 * p4;
          const bool in = k < rank && col < cols;
          float* as = reinterpret_cast<float*>(lh_tc_smem + LH_TC_STAGES * LH_TC_W_BYTES + st * LH_TC_A_BYTES);
          copy16_async(shared_address(as + k * LH_TC_AST + 4 * p4), a + (in ? k * cols + col : 0), in);
          commit_async();
        }

        extern "C" __global__ void __launch_bounds__(256, 3) lh_lora_grouped_norms_tc_bf16(const LhNormItem* __restrict__ items, int count) {
          lh_grid_dependency_sync();
          const LhNormItem it = items[lh_item_of_block(items, count)];
          const int t = threadIdx.x, lane = t & 31, warp = t >> 5, gid = lane >> 2, tig = lane & 3;
          const i64 rows = it.rows, cols = it.cols;
          const int rank = it.rank;
          const i64 row0 = (static_cast<i64>(blockIdx.x) - it.first_block) * LH_TC_ROWS;
          const u16* w = static_cast<const u16*>(it.w);
          const float* a = static_cast<const float*>(it.a);
          u32* fw = reinterpret_cast<u32*>(lh_tc_smem + LH_TC_STAGES * (LH_TC_W_BYTES + LH_TC_A_BYTES));
          float* gpart = reinterpret_cast<float*>(fw + 1024);
          float (*g)[17] = reinterpret_cast<float (*)[17]>(gpart + 8 * 128);
          const i64 chunks = (cols + 63) / 64;
        #pragma unroll
          for (int i = 0; i < LH_TC_STAGES - 1; i++) {
            if (i < chunks) lh_tc_copy(w, a, rows, cols, rank, row0, i, i, t);
            else commit_async();
          }
          // W·Aᵀ (ranks 8·n ..), ‖W_r‖² candidates (rows gid, gid + 8), this warp's share of A·Aᵀ (k-step gks, n-tile gn).
          float p[2][4], wsq[2] = {0.f, 0.f}, gsum[4] = {0.f, 0.f, 0.f, 0.f};
        #pragma unroll
          for (int n = 0; n < 2; n++) {
        #pragma unroll
            for (int e = 0; e < 4; e++) p[n][e] = 0.f;
          }
          const int gks = warp >> 1, gn = warp & 1;
        #pragma unroll 1
          for (i64 ch = 0; ch < chunks; ch++) {
            wait_async<LH_TC_STAGES - 2>();
            __syncthreads();  // chunk ch staged for all; chunk ch − 1's reads of its stage and of the words are done
            const int st = static_cast<int>(ch % LH_TC_STAGES);
            const float* as = reinterpret_cast<const float*>(lh_tc_smem + LH_TC_STAGES * LH_TC_W_BYTES + st * LH_TC_A_BYTES);
        #pragma unroll
            for (int j = 0; j < 2; j++) {
              // Pair e: the words (ks, n, reg) of lane l2: rank 8·n + l2 / 4, columns 16·ks + 2·(l2 % 4) + 8·reg, + 1.
              const int e = t + 256 * j, l2 = e & 31, reg = (e >> 5) & 1, n = (e >> 6) & 1, ks = e >> 7;
              const float2 v = *reinterpret_cast<const float2*>(as + (8 * n + (l2 >> 2)) * LH_TC_AST + 16 * ks + 2 * (l2 & 3) + 8 * reg);
              lh_split_pair(v.x, v.y, fw[LH_TC_WORD(ks, n, reg, 0, l2)], fw[LH_TC_WORD(ks, n, reg, 1, l2)]);
            }
            if (ch + LH_TC_STAGES - 1 < chunks)
              lh_tc_copy(w, a, rows, cols, rank, row0, ch + LH_TC_STAGES - 1, static_cast<int>((ch + LH_TC_STAGES - 1) % LH_TC_STAGES), t);
            else commit_async();
            __syncthreads();  // the words in place
            const u32 wbase = shared_address(lh_tc_smem + st * LH_TC_W_BYTES);
            float q[2][4], gc[4] = {0.f, 0.f, 0.f, 0.f};  // this chunk's W·Wᵀ (rows 8·j ..) and A·Aᵀ
        #pragma unroll
            for (int j = 0; j < 2; j++) {
        #pragma unroll
              for (int e = 0; e < 4; e++) q[j][e] = 0.f;
            }
        #pragma unroll
            for (int ks = 0; ks < 4; ks++) {
              u32 fa[4];
              const int r = warp * 16 + (lane & 15), piece = 2 * ks + (lane >> 4);
              ldsm_x4(fa, wbase + r * 128 + ((piece ^ (r & 7)) << 4));
              u32 hi[2][2], lo[2][2];  // [n-tile][register]
        #pragma unroll
              for (int n = 0; n < 2; n++) {
        #pragma unroll
                for (int reg = 0; reg < 2; reg++) {
                  hi[n][reg] = fw[LH_TC_WORD(ks, n, reg, 0, lane)];
                  lo[n][reg] = fw[LH_TC_WORD(ks, n, reg, 1, lane)];
                }
              }
        #pragma unroll
              for (int n = 0; n < 2; n++) {
                Mma<bf16>::run(p[n], fa, hi[n][0], hi[n][1]);
                Mma<bf16>::run(p[n], fa, lo[n][0], lo[n][1]);
              }
              Mma<bf16>::run(q[0], fa, fa[0], fa[2]);
              Mma<bf16>::run(q[1], fa, fa[1], fa[3]);
              if (ks == gks) {
                // A (ranks × the step's columns) as the row operand: rows gid, 8 + gid are n-tiles 0, 1.
                const u32 ah[4] = {hi[0][0], hi[1][0], hi[0][1], hi[1][1]};
                const u32 al[4] = {lo[0][0], lo[1][0], lo[0][1], lo[1][1]};
                const u32 bh0 = gn ? hi[1][0] : hi[0][0], bh1 = gn ? hi[1][1] : hi[0][1];
                const u32 bl0 = gn ? lo[1][0] : lo[0][0], bl1 = gn ? lo[1][1] : lo[0][1];
                Mma<bf16>::run(gc, ah, bh0, bh1);
                Mma<bf16>::run(gc, ah, bl0, bl1);
                Mma<bf16>::run(gc, al, bh0, bh1);
              }
            }
            wsq[0] += q[0][gid & 1];
            wsq[1] += q[1][2 + (gid & 1)];
        #pragma unroll
            for (int e = 0; e < 4; e++) gsum[e] += gc[e];
          }
          wait_async<0>();
          // A·Aᵀ: each warp's 16 × 8 block (rows gid, gid + 8; columns 8·gn + 2·tig, + 1), then G summed in warp order.
        #pragma unroll
          for (int e = 0; e < 4; e++) gpart[warp * 128 + (gid + 8 * (e >> 1)) * 8 + 2 * tig + (e & 1)] = gsum[e];
          __syncthreads();
          {
            const int k = t >> 4, l = t & 15, n = l >> 3;
            float sum = 0.f;
        #pragma unroll
            for (int v = 0; v < 4; v++) sum += gpart[(2 * v + n) * 128 + k * 8 + (l & 7)];
            g[k][l] = sum;
          }
          __syncthreads();
          const float s = it.s;
          const float* __restrict__ b = static_cast<const float*>(it.b);
          const float* __restrict__ m = static_cast<const float*>(it.m);
        #pragma unroll
          for (int h = 0; h < 2; h++) {
            const i64 r = row0 + warp * 16 + 8 * h + gid;
            const bool rin = r < rows;
            float br[16];
        #pragma unroll
            for (int k = 0; k < 16; k++) br[k] = rin && k < rank ? b[r * rank + k] : 0.f;
            float total = 0.f;
        #pragma unroll
            for (int n = 0; n < 2; n++) {
        #pragma unroll
              for (int j = 0; j < 2; j++) {
                const int k = 8 * n + 2 * tig + j;
                float qk = 0.f;
        #pragma unroll
                for (int l = 0; l < 16; l++) qk = fmaf(br[l], g[l][k], qk);
                total = fmaf(br[k], fmaf(2.f * s, p[n][2 * h + j], s * s * qk), total);
              }
            }
            // ‖W_r‖²: the diagonal of the tile's W·Wᵀ, held by the lane whose columns 2·tig, + 1 include gid.
            if (tig == (gid >> 1)) total += wsq[h];
            total += __shfl_xor_sync(0xffffffffu, total, 1);
            total += __shfl_xor_sync(0xffffffffu, total, 2);
            if (tig == 0 && rin) {
              const float norm = sqrtf(fmaxf(total, 0.f));
              it.norm[r] = norm;
              if (it.c != nullptr) it.c[r] = m[r] / norm;
            }
          }
        }
        """;

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
