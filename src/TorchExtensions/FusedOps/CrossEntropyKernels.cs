using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// The cross-entropy part of the fused linear cross-entropy (<see cref="FusedLinearCrossEntropyFunction"/>) on CUDA: one
/// kernel per chunk reads the chunk's logits in their own dtype (fp32, fp16, bf16) and, per row, gives the row's loss
/// logsumexp − logit[label] in fp32 (0 for ignore_index rows) and, when a gradient is wanted, writes softmax − onehot(label)
/// over the logits in place, in their dtype (the label's column as p − 1 from its fp32 p, as the tensor ops do).
/// </summary>
/// <remarks>
/// Why: the tensor ops (log_softmax into fp32, exp_, scatter_, the cast back) take five passes over a chunk plus two
/// casts of fp32 copies: on an H200 with llama's 128,256-token vocabulary about 1.3 ms of the 3.5 ms per 1024-row chunk
/// (10.4 ms per training step of 8 chunks). The kernel moves the chunk's bytes three times (read for the row's max and
/// sum of exponentials, online in fp32; read and write for the gradient; the second read runs backwards, so the end of
/// the row is still in L2) and allocates nothing of the chunk's size. Measured (H200, llama-1b LoRA 4×2048): 259 us per
/// chunk (466 MB read, 233 MB written), 131.4 -> 123.7 ms per step, peak memory 0.97 GiB lower (no fp32 copy of a
/// chunk). That first version was bound by instruction issue, not HBM, so the hot loops now use one MUFU per exponential
/// and paired bf16 rounding. One block per row, 16-byte loads and stores where the row allows (an unaligned row start or
/// a vocabulary that is no multiple of the vector width is handled element-wise at its two ends).
/// Ignored rows: no loss and, with a gradient, zeros (the caller's row scale zeroes them too). A label outside
/// [0, vocabulary) other than ignore_index gives that row a NaN loss (the tensor ops raise; a check here would need a host
/// sync) and its gradient is the plain softmax. CUDA only; LORAHUB_CE_KERNEL=0 turns it off (the tensor ops then), and a
/// failed compile turns off only this kernel.
/// </remarks>
internal static class CrossEntropyKernels
{
    private static readonly CudaProgram program = new("cross_entropy.cu", Source, dependentLaunch: true);

    // 256 threads per row, at least 4 rows resident per multiprocessor (launch bounds), 4 loads of 16 bytes in flight per
    // thread: enough bytes in flight to keep HBM busy.
    private const int Threads = 256;

    private static long launches;

    /// <summary>Chunks the kernel processed so far (tests: a silent fallback must not pass).</summary>
    public static long Launches => Interlocked.Read(ref launches);

    /// <summary>Whether the kernel may be used (default on; LORAHUB_CE_KERNEL=0: off). Settable (tests, benchmarks).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_CE_KERNEL")?.Trim() != "0";

    /// <summary>Why the kernel is off after a failed compile (null: it compiled, or was not tried).</summary>
    public static string? CompileFailure => program.CompileFailure;

    /// <summary>
    /// True when the kernel applies to the logits of <paramref name="hidden"/> · weightᵀ (CUDA, fp32/fp16/bf16; fp64 and
    /// CPU keep the tensor ops) with <paramref name="labels"/> on the same device.
    /// </summary>
    public static bool Applies(Tensor hidden, Tensor weight, Tensor labels) =>
        Enabled && Usable(hidden) && weight.dtype == hidden.dtype && labels.device_type == DeviceType.CUDA
        && labels.device_index == hidden.device_index && labels.dtype is ScalarType.Int64 or ScalarType.Int32
        && weight.size(0) > 0 && program.Compiles(DeviceIndex(hidden), "the cross-entropy runs as tensor ops instead");

    /// <summary>
    /// For <paramref name="logits"/> (rows × vocabulary, contiguous, CUDA) and <paramref name="labels"/> (rows, int64,
    /// contiguous): writes each row's loss into <paramref name="rowLoss"/> (rows, fp32, contiguous) and, when
    /// <paramref name="gradient"/>, overwrites the logits with softmax − onehot(label) (zeros on ignored rows). Enqueued
    /// on the default stream; no host sync. Call only where <see cref="Applies"/>.
    /// </summary>
    public static void Forward(Tensor logits, Tensor labels, long ignoreIndex, Tensor rowLoss, bool gradient)
    {
        if (logits.dim() != 2 || !logits.is_contiguous() || labels.dtype != ScalarType.Int64 || !labels.is_contiguous()
            || rowLoss.dtype != ScalarType.Float32 || !rowLoss.is_contiguous() || labels.size(0) != logits.size(0) || rowLoss.size(0) != logits.size(0))
            throw new ArgumentException($"cross-entropy kernel: logits {Shape(logits)} contiguous, labels int64 and row losses fp32 of its rows expected");
        long rows = logits.size(0), cols = logits.size(1);
        if (rows == 0) return;
        var device = DeviceIndex(logits);
        var args = new KernelArgs().Ptr(Ptr(logits)).Ptr(Ptr(labels)).Ptr(Ptr(rowLoss)).I64(cols).I64(ignoreIndex).I32(gradient ? 1 : 0);
        // Rows in L2: one block per multiprocessor walks its rows, so the rows being read at once (a multiprocessor's
        // worth each) fit in L2 and the gradient pass reads its row from there, not from HBM again.
        var walkers = RowsInL2(rows, cols, logits.element_size(), device);
        if (walkers > 0)
            program.Function(device, $"lh_cross_entropy_walk_{Suffix(logits.dtype)}").Launch(walkers, WalkThreads, 0, args.I64(rows));
        else
            program.Function(device, $"lh_cross_entropy_{Suffix(logits.dtype)}").Launch(checked((int)rows), Threads, 0, args);
        Interlocked.Increment(ref launches);
    }

    private const int WalkThreads = 1024;

    /// <summary>
    /// Whether the gradient pass reads its rows from L2 (LORAHUB_CE_ROWS_IN_L2; default on, 0: off): one block of 1,024
    /// threads per multiprocessor walks rows (block b takes rows b, b + blocks, …) instead of a block per row, four or
    /// more resident per multiprocessor. With a block per row the whole chunk is read before any row's second pass
    /// (1,024 rows of 128,256 bf16 logits: 263 MB against H200's 50 MB of L2), so the chunk crosses HBM three times; with
    /// one row per multiprocessor in flight (132 × 256 KB) part of the second read hits L2. Measured on an H200 (llama-1b
    /// LoRA 4×2048): 178.5 µs a 1,024-row chunk instead of 197.6, 87,855 and 87,721 tok/s against 87,509 and 87,390. The
    /// same arithmetic, but 1,024 threads add a row's exponentials in another order than 256: a loss may differ in its
    /// last bits (deterministic either way). Cache hints (the gradient pass's loads and stores evicted first, the first
    /// pass's kept) measured no faster: 86,513 and 86,249 tok/s against 86,327 and 86,352.
    /// </summary>
    public static bool RowsInL2Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_CE_ROWS_IN_L2")?.Trim() != "0";

    // Walking blocks to launch (0: a block per row): one per multiprocessor, where there are more rows than that and a
    // multiprocessor's row fits a third of its share of L2 (H100/H200: 50 MB over 132, ~380 KB; 128,256 bf16 = 256 KB).
    private static int RowsInL2(long rows, long cols, long elementBytes, int device)
    {
        if (!RowsInL2Enabled) return 0;
        var sms = CudaKernels.MultiprocessorCount(device);
        var l2 = CudaKernels.L2CacheBytes(device);
        return rows > sms && l2 > 0 && cols * elementBytes * sms <= l2 * 3 / 4 ? sms : 0;
    }

    // One block per row. Pass 1 keeps, per thread, the running max m of the row's values and the sum s of exp(x − m)
    // (rescaled when m grows), merged across the block; lse = m + log s. Pass 2 (gradient) reads the row again and writes
    // exp(x − lse), the label's column as exp(x − lse) − 1 rounded once, and the thread holding that column writes the
    // row's loss lse − x. Exponentials as 2^((x − m)·log2 e) by ex2.approx.ftz.
    private const string Source = """
        #include "lh_common.cuh"

        #define LH_CE_THREADS 256
        #define LH_CE_UNROLL 4
        #define LH_LOG2E 1.4426950408889634f

        // The running max starts at −FLT_MAX, not −inf: exp(x − m) of a −inf value is then 0 with no NaN from −inf − (−inf),
        // so the hot loop needs no test (a row of −inf only still ends with lse = −inf and a NaN loss, as log_softmax).
        __device__ __forceinline__ float lh_ce_lowest() { return __uint_as_float(0xff7fffffu); }

        // 2^x as the one MUFU instruction: exp2f without flush-to-zero wraps it in a subnormal fix-up of 3 more instructions
        // per element. Same accuracy (~2 ulp); results below 2^-126 (p < 1.2e-38, nothing for a softmax) become 0.
        __device__ __forceinline__ float lh_ce_exp2(float x) {
        #if defined(__CUDA_ARCH__)
          float y;
          asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
          return y;
        #else
          return exp2f(x);
        #endif
        }

        // exp(from − to) for the merges; 1 when equal (also for +inf and +inf).
        __device__ __forceinline__ float lh_ce_scale(float from, float to) {
          return from == to ? 1.f : lh_ce_exp2((from - to) * LH_LOG2E);
        }

        struct MaxSum {
          float m;  // running max
          float s;  // Σ exp(x − m)
        };

        __device__ __forceinline__ MaxSum lh_ce_merge(MaxSum a, MaxSum b) {
          const float m = fmaxf(a.m, b.m);
          MaxSum r;
          r.m = m;
          r.s = a.s * lh_ce_scale(a.m, m) + b.s * lh_ce_scale(b.m, m);
          return r;
        }

        // Adds n values (already fp32) to a thread's (m, s): the max first, one rescale, then the exponentials.
        template <int N>
        __device__ __forceinline__ void lh_ce_add(MaxSum& a, const float (&x)[N]) {
          float pm = x[0];
        #pragma unroll
          for (int k = 1; k < N; k++) pm = fmaxf(pm, x[k]);
          if (pm > a.m) {
            a.s *= lh_ce_exp2((a.m - pm) * LH_LOG2E);
            a.m = pm;
          }
        #pragma unroll
          for (int k = 0; k < N; k++) a.s += lh_ce_exp2((x[k] - a.m) * LH_LOG2E);
        }

        // (m, s) of the whole block; every thread gets it.
        __device__ __forceinline__ MaxSum lh_ce_block_merge(MaxSum v, float* sm, float* ss) {
          const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
          const int warps = (blockDim.x + 31) >> 5;
        #pragma unroll
          for (int o = 16; o > 0; o >>= 1) {
            MaxSum w;
            w.m = __shfl_xor_sync(0xffffffffu, v.m, o);
            w.s = __shfl_xor_sync(0xffffffffu, v.s, o);
            v = lh_ce_merge(v, w);
          }
          if (lane == 0) {
            sm[warp] = v.m;
            ss[warp] = v.s;
          }
          __syncthreads();
          if (warp == 0) {
            MaxSum u;
            u.m = lane < warps ? sm[lane] : lh_ce_lowest();
            u.s = lane < warps ? ss[lane] : 0.f;
        #pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
              MaxSum w;
              w.m = __shfl_xor_sync(0xffffffffu, u.m, o);
              w.s = __shfl_xor_sync(0xffffffffu, u.s, o);
              u = lh_ce_merge(u, w);
            }
            if (lane == 0) {
              sm[0] = u.m;
              ss[0] = u.s;
            }
          }
          __syncthreads();
          MaxSum r;
          r.m = sm[0];
          r.s = ss[0];
          return r;
        }

        // d loss / d x of column c: softmax exp(x − lse), minus 1 in fp32 at the label's column, whose loss lse − x it writes.
        __device__ __forceinline__ float lh_ce_grad(float x, i64 c, i64 label, float lse, float* loss) {
          const float q = lh_ce_exp2((x - lse) * LH_LOG2E);
          if (c != label) return q;
          *loss = lse - x;
          return q - 1.f;
        }

        // A row of `cols` elements at `row` split into an element-wise head up to the first 16-byte boundary, whole packs
        // of N, and an element-wise tail.
        template <typename T, int N>
        struct RowSplit {
          i64 head, packs, tail;
          __device__ __forceinline__ RowSplit(const T* row, i64 cols) {
            const i64 mis = static_cast<i64>((reinterpret_cast<u64>(row) / sizeof(T)) % N);
            head = mis == 0 ? 0 : (N - mis < cols ? N - mis : cols);
            packs = (cols - head) / N;
            tail = cols - head - packs * N;
          }
        };

        template <typename T, int N>
        __device__ __forceinline__ void cross_entropy_row(T* __restrict__ logits, const i64* __restrict__ labels,
                                                          float* __restrict__ loss, i64 cols, i64 ignore_index, int grad,
                                                          const i64 r) {
          __shared__ float sm[32], ss[32];
          T* row = logits + r * cols;
          const i64 label = labels[r];
          const int tid = threadIdx.x;
          const int nt = blockDim.x;
          const RowSplit<T, N> split(row, cols);
          T* body = row + split.head;
          const i64 tail0 = split.head + split.packs * N;

          if (label == ignore_index) {  // the same for the whole block: it leaves before any barrier
            if (tid == 0) loss[r] = 0.f;
            if (!grad) return;
            Pack<T, N> z;
        #pragma unroll
            for (int k = 0; k < N; k++) z.v[k] = Cvt<T>::from(0.f);
            for (i64 i = tid; i < split.packs; i += nt) store_pack<T, N>(body, i, z);
            if (tid < split.head) row[tid] = Cvt<T>::from(0.f);
            if (tid < split.tail) row[tail0 + tid] = Cvt<T>::from(0.f);
            return;
          }
          const bool in_range = label >= 0 && label < cols;

          MaxSum a;
          a.m = lh_ce_lowest();
          a.s = 0.f;
          for (i64 i = tid; i < split.packs; i += LH_CE_UNROLL * nt) {
            Pack<T, N> p[LH_CE_UNROLL];
        #pragma unroll
            for (int u = 0; u < LH_CE_UNROLL; u++)
              if (i + u * nt < split.packs) p[u] = load_pack<T, N>(body, i + u * nt);
        #pragma unroll
            for (int u = 0; u < LH_CE_UNROLL; u++) {
              if (i + u * nt < split.packs) {
                float x[N];
        #pragma unroll
                for (int k = 0; k < N; k++) x[k] = Cvt<T>::to(p[u].v[k]);
                lh_ce_add<N>(a, x);
              }
            }
          }
          if (tid < split.head) {
            const float x[1] = {Cvt<T>::to(row[tid])};
            lh_ce_add<1>(a, x);
          }
          if (tid < split.tail) {
            const float x[1] = {Cvt<T>::to(row[tail0 + tid])};
            lh_ce_add<1>(a, x);
          }
          const MaxSum t = lh_ce_block_merge(a, sm, ss);
          const float lse = t.m + logf(t.s);
          if (!grad) {  // the row stays as it is: its label's logit can be read now
            if (tid == 0) loss[r] = in_range ? lse - Cvt<T>::to(row[label]) : __uint_as_float(0x7fc00000u);
            return;
          }
          // With a gradient the thread that rewrites the label's column writes the loss from the value it read (no thread
          // reads what another one writes).
          if (tid == 0 && !in_range) loss[r] = __uint_as_float(0x7fc00000u);

          // Last packs first: the end of the row, read last by pass 1, is the part most likely still in L2.
          for (i64 i = tid; i < split.packs; i += LH_CE_UNROLL * nt) {
            Pack<T, N> p[LH_CE_UNROLL];
        #pragma unroll
            for (int u = 0; u < LH_CE_UNROLL; u++)
              if (i + u * nt < split.packs) p[u] = load_pack<T, N>(body, split.packs - 1 - (i + u * nt));
        #pragma unroll
            for (int u = 0; u < LH_CE_UNROLL; u++) {
              const i64 j = split.packs - 1 - (i + u * nt);
              if (j >= 0) {
                float q[N];
        #pragma unroll
                for (int k = 0; k < N; k++) q[k] = lh_ce_exp2((Cvt<T>::to(p[u].v[k]) - lse) * LH_LOG2E);
                const i64 at = label - (split.head + j * N);  // the label's place in this pack, if it is in it
                if (at >= 0 && at < N) {
        #pragma unroll
                  for (int k = 0; k < N; k++) {
                    if (k == at) {
                      loss[r] = lse - Cvt<T>::to(p[u].v[k]);
                      q[k] -= 1.f;
                    }
                  }
                }
                store_pack<T, N>(body, j, lh_round_pack<T, N>(q));
              }
            }
          }
          if (tid < split.head) row[tid] = Cvt<T>::from(lh_ce_grad(Cvt<T>::to(row[tid]), tid, label, lse, loss + r));
          if (tid < split.tail) {
            const i64 c = tail0 + tid;
            row[c] = Cvt<T>::from(lh_ce_grad(Cvt<T>::to(row[c]), c, label, lse, loss + r));
          }
        }

        // A block per row; or (walk) a block per multiprocessor taking rows blockIdx.x, + gridDim.x, …: the barrier before
        // each row keeps its merge from overwriting the previous row's (m, s) while a warp still reads them.
        #define LH_CE_ENTRY(T, S)                                                                                            \
          extern "C" __global__ void __launch_bounds__(LH_CE_THREADS, 4)                                                      \
              lh_cross_entropy_##S(T* logits, const i64* labels, float* loss, i64 cols, i64 ignore_index, int grad) { lh_grid_dependency_sync();         \
            cross_entropy_row<T, 16 / sizeof(T)>(logits, labels, loss, cols, ignore_index, grad, blockIdx.x);                \
          }                                                                                                                   \
          extern "C" __global__ void __launch_bounds__(1024, 1)                                                               \
              lh_cross_entropy_walk_##S(T* logits, const i64* labels, float* loss, i64 cols, i64 ignore_index, int grad,      \
                                        i64 rows) { lh_grid_dependency_sync();                                                                           \
            for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {                                                              \
              __syncthreads();                                                                                                \
              cross_entropy_row<T, 16 / sizeof(T)>(logits, labels, loss, cols, ignore_index, grad, r);                       \
            }                                                                                                                 \
          }

        LH_CE_ENTRY(float, f32)
        LH_CE_ENTRY(f16, f16)
        LH_CE_ENTRY(bf16, bf16)
        """;
}
