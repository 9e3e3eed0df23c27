using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// DoRA's grouped norms through cuBLAS (<see cref="GroupedGemm"/>): the one product that reads W, W·Aᵀ, as batched
/// tensor-core GEMMs instead of seventeen fp32 FMAs an element of W.
/// </summary>
public static partial class LoraWeightNorms
{
    /// <summary>
    /// Whether groups compute the items that fit (<see cref="GemmApplies"/>: bf16 W 16-byte aligned, fp32 A, B and m, rank
    /// ≤ <see cref="GemmMaxRank"/>, sm_80+, cuBLAS loaded) in factored form, ‖V_i‖² = ‖W_i‖² + 2s·B_i·(W·Aᵀ)_i +
    /// s²·B_i·(A·Aᵀ)·B_iᵀ: one launch splits every A into bf16 high and low parts (A = hi + lo within 2⁻¹⁶) and forms A·Aᵀ
    /// in fp32; then per chunk of items of one shape, W·[A_hi; A_lo]ᵀ by one batched cuBLAS GEMM (bf16 in, fp32
    /// accumulation and out; W exact in bf16) and a kernel that adds the terms with ‖W_i‖² — taken once when the launch is
    /// prepared, as W is frozen (writes through the tuner layer change DoRA's norm key, and DoRA prepares again) — and
    /// writes ‖V‖ and c = m/‖V‖. The same norms within fp32 rounding, not the FMA kernels' bits; an item's bits may depend
    /// on the others of its chunk (cuBLAS picks its kernel by the batch), never on the run. Default on
    /// (LORAHUB_DORA_NORM_GEMM=0: the FMA kernels). Settable at run time; a prepared launch keeps the path it was prepared
    /// with.
    /// </summary>
    public static bool GroupedGemm { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_DORA_NORM_GEMM")?.Trim() != "0";

    /// <summary>The largest rank the GEMM path takes (its kernels hold A's chunks and A·Aᵀ in shared memory).</summary>
    public const int GemmMaxRank = 64;

    /// <summary>
    /// The most bytes of W·[A_hi; A_lo]ᵀ (fp32) one chunk's GEMM writes: a prepared launch's workspace for them (items of one
    /// shape beyond it take further chunks; a chunk holds one item at least). Default 32 MiB: one chunk for each shape of
    /// llama-1b's 16 layers; a memory-tight run may lower it. Read when a launch is prepared.
    /// </summary>
    public static long GemmChunkBytes { get; set; } = 32L << 20;

    private static long gemmItems, gemmChunks;

    /// <summary>Projections whose norms the GEMM path (<see cref="GroupedGemm"/>) computed so far.</summary>
    public static long GroupedGemmItems => Interlocked.Read(ref gemmItems);

    /// <summary>Chunks the GEMM path ran so far (a GEMM and a combining launch each).</summary>
    public static long GroupedGemmChunks => Interlocked.Read(ref gemmChunks);

    private static readonly CudaProgram gemmProgram = new("lora_grouped_norms_gemm.cu", GemmSource, dependentLaunch: true);

    /// <summary>NVRTC's message when the GEMM path's kernels did not compile (null: they did, or were not tried).</summary>
    public static string? GroupedGemmCompileFailure => gemmProgram.CompileFailure;

    // Per device: whether cuBLAS takes bf16 × bf16 → fp32 batched GEMMs there (asked once with a 1 × 1 × 1 product).
    private static readonly Dictionary<int, bool> gemmSupported = new();

    /// <summary>Whether a fitting item (<see cref="GroupedApplies"/>) can take the GEMM path (<see cref="GroupedGemm"/>).</summary>
    public static bool GemmApplies(LowRankNormItem item) => GroupedApplies(item) && GemmFits(item);

    // What the GEMM path asks of an item beyond GroupedApplies.
    private static bool GemmFits(LowRankNormItem item) =>
        item.W.dtype == ScalarType.BFloat16 && item.A.dtype == ScalarType.Float32 && item.A.size(0) <= GemmMaxRank
        && Aligned16(Ptr(item.W)) && item.W.size(0) <= int.MaxValue / (2 * GemmMaxRank)
        && CudaKernels.ComputeCapability(DeviceIndex(item.W)) >= 80 && Cublas.UnavailableReason is null;

    // One chunk: items of one shape (rows × cols, rank) whose products fit the workspace, and its table: the pointer arrays
    // cuBLAS reads (W, the split A, the products: one each per item), then the combining kernel's items (B, m, norm, c,
    // ‖W‖², A·Aᵀ, s: GemmItemWords each).
    internal sealed record GemmChunk(int Rows, int Cols, int Rank, int Count, Tensor Table);

    private const int GemmItemWords = 7;

    // Columns of A one block of the split-and-Gram launch takes (its partial A·Aᵀ is one of the item's column splits).
    internal const int GramColumns = 512;

    // Lanes of a warp one row takes in the combining kernel (its rank, or rank / 2 above 32, rounded up to a power of 2).
    private static int GemmLanes(int rank) => rank <= 8 ? 8 : rank <= 16 ? 16 : 32;

    // A prepared launch's GEMM path: the split-and-Gram launch over every item (its table: A, the split A, A·Aᵀ, cols,
    // rank) and the chunks, with what they share: the split A and A·Aᵀ of every item, the products of the largest chunk
    // (chunks run in order on one stream) and the items' ‖W_i‖².
    internal sealed class GemmPlan(Tensor gramTable, int gramSplits, List<GemmChunk> chunks, Tensor split, Tensor products, Tensor gram,
        Tensor weightNorms, int items) : IDisposable
    {
        private int disposed;

        public void Run(int device, IntPtr stream)
        {
            gemmProgram.Function(device, "lh_dora_split_gram").Launch(new Dim3((uint)gramSplits, (uint)items), 256, 0,
                new KernelArgs().Ptr(Ptr(gramTable)), stream);
            var combine = gemmProgram.Function(device, "lh_dora_gemm_norms");
            foreach (var c in chunks)
            {
                var t = Ptr(c.Table);
                // Column-major for cuBLAS: P_iᵀ (2r × rows) = [A_hi; A_lo] (read as cols × 2r, transposed) · W_i (read as cols × rows).
                if (!Cublas.GemmBatched(device, stream, Cublas.OpT, Cublas.OpN, 2 * c.Rank, c.Rows, c.Cols, t + c.Count * 8, Cublas.R16BF, c.Cols,
                        t, Cublas.R16BF, c.Cols, t + 2 * c.Count * 8, Cublas.R32F, 2 * c.Rank, c.Count))
                    throw new TorchException(TorchErrorKind.Generic, "cuBLAS refused DoRA's norm GEMMs after taking them when prepared; " +
                        "set LORAHUB_DORA_NORM_GEMM=0");
                // Each block 8 warps of 4 row groups (32 / lanes a row: 2 rows a group at ranks ≤ 16).
                var rowsPerBlock = 32 * (32 / GemmLanes(c.Rank));
                combine.Launch(new Dim3((uint)((c.Rows + rowsPerBlock - 1) / rowsPerBlock), (uint)c.Count), 256, 0,
                    new KernelArgs().Ptr(t + 3 * c.Count * 8).Ptr(Ptr(products)).I64(c.Rows).I32(c.Rank), stream);
                Interlocked.Increment(ref gemmChunks);
            }
            Interlocked.Add(ref gemmItems, items);
        }

        public void Dispose()
        {
            if (Interlocked.Exchange(ref disposed, 1) == 1) return;
            gramTable.Dispose();
            foreach (var c in chunks) c.Table.Dispose();
            foreach (var t in new[] { split, products, gram, weightNorms }) t.Dispose();
        }
    }

    // The GEMM path for items that fit it (GemmApplies), or null when none do, its kernels did not compile or cuBLAS does
    // not take the GEMMs here. ‖W_i‖² is taken now, on libtorch's stream.
    private static GemmPlan? PrepareGemm(IReadOnlyList<LowRankNormItem> items, int device)
    {
        if (items.Count == 0 || !GemmWorks(items[0].W, device)) return null;
        // Offsets in elements, each item's block starting 16-byte aligned (cuBLAS's batched GEMMs assume aligned matrices).
        static long Up(long elements, int size) => (elements * size + 15) / 16 * 16 / size;
        var layouts = new List<(List<LowRankNormItem> items, int rows, int cols, int rank)>();
        long productElems = 0;
        foreach (var shape in items.GroupBy(i => (rows: (int)i.W.size(0), cols: (int)i.W.size(1), rank: (int)i.A.size(0))))
        {
            var (rows, cols, rank) = shape.Key;
            var per = (int)Math.Max(1, Math.Min(GemmChunkBytes / (4L * rows * 2 * rank), int.MaxValue));
            foreach (var chunk in shape.Chunk(per))
            {
                layouts.Add((chunk.ToList(), rows, cols, rank));
                productElems = Math.Max(productElems, chunk.Length * Up((long)rows * 2 * rank, 4));
            }
        }
        long splitElems = 0, gramElems = 0, normElems = 0;
        var gramSplits = 1;
        foreach (var it in items)
        {
            var splits = (int)((it.A.size(1) + GramColumns - 1) / GramColumns);
            gramSplits = Math.Max(gramSplits, splits);
            splitElems += Up(2 * it.A.size(0) * it.A.size(1), 2);
            gramElems += splits * it.A.size(0) * it.A.size(0);
            normElems += it.W.size(0);
        }
        var dev = items[0].W.device;
        var split = empty([splitElems], ScalarType.BFloat16, dev).DetachFromDisposeScope();
        var products = empty([productElems], ScalarType.Float32, dev).DetachFromDisposeScope();
        var gram = empty([gramElems], ScalarType.Float32, dev).DetachFromDisposeScope();
        var norms = empty([normElems], ScalarType.Float32, dev).DetachFromDisposeScope();
        var gramWords = new List<long>();
        var chunks = new List<GemmChunk>();
        long splitAt = 0, gramAt = 0, normAt = 0;
        foreach (var (chunk, rows, cols, rank) in layouts)
        {
            var n = chunk.Count;
            var words = new long[n * (3 + GemmItemWords)];
            for (var k = 0; k < n; k++)
            {
                var it = chunk[k];
                IntPtr splitPtr = Ptr(split) + (nint)(splitAt * 2), gramPtr = Ptr(gram) + (nint)(gramAt * 4), normPtr = Ptr(norms) + (nint)(normAt * 4);
                using (NewDisposeScope())
                    norms.narrow(0, normAt, rows).copy_(row_norms_squared(it.W) ?? it.W.to(ScalarType.Float32).square().sum(1));
                gramWords.AddRange([(long)Ptr(it.A), (long)splitPtr, (long)gramPtr, cols, rank]);
                words[k] = (long)Ptr(it.W);
                words[n + k] = (long)splitPtr;
                words[2 * n + k] = (long)Ptr(products) + k * Up((long)rows * 2 * rank, 4) * 4;
                var o = 3 * n + k * GemmItemWords;
                words[o] = (long)Ptr(it.B);
                words[o + 1] = it.Magnitude is null ? 0 : (long)Ptr(it.Magnitude);
                words[o + 2] = (long)Ptr(it.Norm);
                words[o + 3] = it.Scale is null ? 0 : (long)Ptr(it.Scale);
                words[o + 4] = (long)normPtr;
                words[o + 5] = (long)gramPtr;
                var splits = (cols + GramColumns - 1) / GramColumns;
                words[o + 6] = (uint)BitConverter.SingleToInt32Bits((float)it.Scaling) | (long)splits << 32;
                splitAt += Up(2L * rank * cols, 2);
                gramAt += (long)splits * rank * rank;
                normAt += rows;
            }
            using var host = tensor(words);
            chunks.Add(new GemmChunk(rows, cols, rank, n, host.to(dev).DetachFromDisposeScope()));
        }
        using var gramHost = tensor(gramWords.ToArray());
        return new GemmPlan(gramHost.to(dev).DetachFromDisposeScope(), gramSplits, chunks, split, products, gram, norms, items.Count);
    }

    // Whether the GEMM path can run on the device: its kernels compile and cuBLAS takes bf16 × bf16 → fp32 batched GEMMs
    // (asked once per device).
    private static bool GemmWorks(Tensor like, int device)
    {
        if (!gemmProgram.Compiles(device, "the FMA kernels compute DoRA's norms")) return false;
        lock (gemmSupported)
        {
            if (gemmSupported.TryGetValue(device, out var known)) return known;
            using var scope = NewDisposeScope();
            var one = ones([8], ScalarType.BFloat16, like.device);
            var result = zeros([4], ScalarType.Float32, like.device);
            var pointers = tensor(new[] { (long)Ptr(one), (long)Ptr(one), (long)Ptr(result) }).to(like.device);
            var p = Ptr(pointers);
            var works = Cublas.GemmBatched(device, CudaDriver.LegacyStream, Cublas.OpT, Cublas.OpN, 1, 1, 1, p, Cublas.R16BF, 1, p + 8,
                Cublas.R16BF, 1, p + 16, Cublas.R32F, 1, 1) && result[0].item<float>() == 1f;
            if (!works) Console.Error.WriteLine("LoRAHub: cuBLAS does not take bf16 × bf16 → fp32 batched GEMMs here; the FMA kernels compute DoRA's norms");
            return gemmSupported[device] = works;
        }
    }

    // lh_dora_split_gram: block (x, item) takes columns [512·x, 512·x + 512) of the item's A (rank × cols, fp32; blocks past
    // its columns return): writes them as [A_hi; A_lo] (2·rank × cols, bf16: hi = bf16(a), lo = bf16(a − hi)) and their
    // part of A·Aᵀ (rank × rank, fp32) as the item's partial x, A staged 64 columns at a time; each thread sums its (k, l)
    // pairs over the columns in order. Stage rows are padded to 65 floats so that a warp's reads of 32 rows hit 32 banks.
    // lh_dora_gemm_norms: L lanes a row (L = 8, 16 or 32 by the rank; 32 / L rows a warp at once), lane k holding ranks k,
    // k + L, …; with P = W·[A_hi; A_lo]ᵀ (rows × 2r, fp32, from the chunk's GEMM) and G = A·Aᵀ (its partials summed in
    // order): ‖V_i‖² = ‖W_i‖² + Σ_k B_ik·(2s·(P_ik + P_i,r+k) + s²·(G·B_i)_k), B_i passed between a row's lanes by
    // shuffles; ‖V_i‖ = √‖V_i‖² (negative rounding → 0) and c = m/‖V‖ (IEEE division, as torch's m.div(norm)).
    internal const string GemmSource = """
        #include "lh_common.cuh"

        #define LH_GEMM_MAX_RANK 64
        #define LH_GEMM_COLS 64
        #define LH_GEMM_SPLIT_COLS 512
        #define LH_GEMM_PAIRS (LH_GEMM_MAX_RANK * LH_GEMM_MAX_RANK / 256)

        struct LhGramItem {
          const float* a;
          u16* split;
          float* gram;   // the item's partials: one rank × rank matrix per 512 columns
          i64 cols;
          i64 rank;
        };

        struct LhGemmItem {
          const float* b;
          const float* m;      // null: no row scale
          float* norm;
          float* c;
          const float* wn2;    // ‖W_i‖²
          const float* gram;   // A·Aᵀ in `splits` partials
          float s;
          int splits;
        };

        extern "C" __global__ void __launch_bounds__(256) lh_dora_split_gram(const LhGramItem* items) {
          lh_grid_dependency_sync();
          __shared__ float sa[LH_GEMM_MAX_RANK * (LH_GEMM_COLS + 1)];
          const LhGramItem it = items[blockIdx.y];
          const int rank = (int)it.rank, pairs = rank * rank;
          const i64 cols = it.cols, first = (i64)blockIdx.x * LH_GEMM_SPLIT_COLS;
          if (first >= cols) return;
          const i64 last = first + LH_GEMM_SPLIT_COLS < cols ? first + LH_GEMM_SPLIT_COLS : cols;
          u16* hi = it.split;
          u16* lo = it.split + rank * cols;
          float acc[LH_GEMM_PAIRS];
        #pragma unroll
          for (int q = 0; q < LH_GEMM_PAIRS; q++) acc[q] = 0.f;
          for (i64 c0 = first; c0 < last; c0 += LH_GEMM_COLS) {
            for (int e = threadIdx.x; e < rank * LH_GEMM_COLS; e += 256) {
              const int k = e / LH_GEMM_COLS, c = e % LH_GEMM_COLS;
              float x = 0.f;
              if (c0 + c < last) {
                const i64 at = k * cols + c0 + c;
                x = it.a[at];
                const u16 h = float_to_bf16(x);
                hi[at] = h;
                lo[at] = float_to_bf16(x - bf16_to_float(h));
              }
              sa[k * (LH_GEMM_COLS + 1) + c] = x;
            }
            __syncthreads();
        #pragma unroll
            for (int q = 0; q < LH_GEMM_PAIRS; q++) {
              const int e = threadIdx.x + 256 * q;
              if (e < pairs) {
                const float* x = sa + (e / rank) * (LH_GEMM_COLS + 1);
                const float* y = sa + (e % rank) * (LH_GEMM_COLS + 1);
                float sum = acc[q];
                for (int c = 0; c < LH_GEMM_COLS; c++) sum = fmaf(x[c], y[c], sum);
                acc[q] = sum;
              }
            }
            __syncthreads();
          }
          float* out = it.gram + (i64)blockIdx.x * pairs;
        #pragma unroll
          for (int q = 0; q < LH_GEMM_PAIRS; q++) {
            const int e = threadIdx.x + 256 * q;
            if (e < pairs) out[e] = acc[q];
          }
        }

        extern "C" __global__ void __launch_bounds__(256) lh_dora_gemm_norms(const LhGemmItem* items, const float* products, i64 rows,
                                                                             int rank) {
          lh_grid_dependency_sync();
          __shared__ float g[LH_GEMM_MAX_RANK * (LH_GEMM_MAX_RANK + 1)];
          const LhGemmItem it = items[blockIdx.y];
          const int pairs = rank * rank;
          for (int e = threadIdx.x; e < pairs; e += blockDim.x) {
            float sum = 0.f;
            for (int x = 0; x < it.splits; x++) sum += it.gram[(i64)x * pairs + e];
            g[(e / rank) * (LH_GEMM_MAX_RANK + 1) + e % rank] = sum;
          }
          __syncthreads();
          const int L = rank <= 8 ? 8 : rank <= 16 ? 16 : 32;   // lanes a row (the launcher's GemmLanes)
          const int lane = threadIdx.x & (L - 1), group = (threadIdx.x & 31) / L, warp = threadIdx.x >> 5, per_warp = 32 / L;
          const float s = it.s;
          // Items of a chunk are 16-byte aligned apart (the launcher's layout): the item's products start here.
          const i64 stride = (rows * 2 * rank + 3) / 4 * 4;
          for (int j = 0; j < 4; j++) {
            const i64 row = (((i64)blockIdx.x * 8 + warp) * 4 + j) * per_warp + group;
            // Rows past the end still take part in the shuffles (a whole warp runs them), with nothing to write.
            const bool live = row < rows;
            const float* p = products + (i64)blockIdx.y * stride + row * 2 * rank;
            const float* b = it.b + row * rank;
            const bool has0 = live && lane < rank, has1 = live && lane + 32 < rank;
            const float b0 = has0 ? b[lane] : 0.f, b1 = has1 ? b[lane + 32] : 0.f;
            float gb0 = 0.f, gb1 = 0.f;
            for (int l = 0; l < rank; l++) {
              const float bl = __shfl_sync(0xffffffffu, l < 32 ? b0 : b1, l & 31, L);
              if (has0) gb0 = fmaf(g[lane * (LH_GEMM_MAX_RANK + 1) + l], bl, gb0);
              if (has1) gb1 = fmaf(g[(lane + 32) * (LH_GEMM_MAX_RANK + 1) + l], bl, gb1);
            }
            float t = 0.f;
            if (has0) t = b0 * fmaf(2.f * s, p[lane] + p[rank + lane], s * s * gb0);
            if (has1) t = fmaf(b1, fmaf(2.f * s, p[lane + 32] + p[rank + lane + 32], s * s * gb1), t);
            for (int o = L / 2; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o, L);
            if (live && lane == 0) {
              float sumsq = it.wn2[row] + t;
              if (sumsq < 0.f) sumsq = 0.f;
              const float norm = sqrtf(sumsq);
              it.norm[row] = norm;
              if (it.c != nullptr) it.c[row] = it.m[row] / norm;
            }
          }
        }
        """;
}
