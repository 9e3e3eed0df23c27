using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// The decoder layer's output r + mlp(x) with the MLP's last steps in one CUDA pass: from down_proj's frozen base
/// product y = h·W_dᵀ (cuBLAS), the thin product xa = h·A_dᵀ, B_d, s and DoRA's row scale c (null: 1), it writes
/// out = r + c ⊙ (y + s·xa·B_dᵀ) for the residual stream r, where the addmm of the update, the row-scale pass and the
/// residual add each read and wrote a tokens × hidden tensor (llama-1b, 8192 × 2048 bf16 on an H200: 16 + 12.5 + 25 µs
/// per layer). Where c needs its gradient the pass also writes c ⊙ (y + s·xa·B_dᵀ) over y (rounded once to y's
/// dtype), which <see cref="LoraRowScaleKernels.RowScaleBackward"/> reads as
/// before. The per-element math is lh_lowrank_epilogue.cuh's (fp32, one rounding of out); the update's dot products
/// come from tensor cores (mma.m16n8k16, fp32 accumulate), B's fragments held in registers while a warp walks the tokens.
/// <para>
/// sm_80+, bf16 and fp16, contiguous tensors 16-byte aligned, widths a multiple of 8, even ranks up to 64 (or no update),
/// no bias on down_proj. LORAHUB_DOWN_RESIDUAL_EPILOGUE=0 turns the path off (the decoder then adds mlp(x) to the
/// stream as a separate op, and the MLP block keeps its addmm and row-scale pass); a compile failure turns off only this
/// kernel (<see cref="CompileFailure"/>: the fused MLP block then adds the residual by a tensor op).
/// </para>
/// </summary>
internal static class LoraDownResidualKernels
{
    /// <summary>Largest rank taken.</summary>
    public const long MaxRank = 64;

    private const int Threads = 256;

    private static CudaProgram program = new("lora_down_residual.cu", Source, dependentLaunch: true);

    private static long launches;

    /// <summary>Forward passes that ran the kernel so far (tests: a silent fallback must not pass).</summary>
    public static long Launches => Interlocked.Read(ref launches);

    /// <summary>
    /// Whether the decoder hands its residual stream to the fused MLP block (default on; LORAHUB_DOWN_RESIDUAL_EPILOGUE=0:
    /// off, the separate add as before).
    /// </summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_DOWN_RESIDUAL_EPILOGUE")?.Trim() != "0";

    /// <summary>
    /// Blocks per multiprocessor the grid aims at (1..8, or null: as many as run at once, <see cref="Resident"/>;
    /// LORAHUB_DOWN_RESIDUAL_BLOCKS sets it). Results do not depend on it.
    /// </summary>
    public static int? BlocksPerSm
    {
        get => blocksPerSm;
        set => blocksPerSm = value is null or (>= 1 and <= 8) ? value : throw new ArgumentOutOfRangeException(nameof(value), value, "1..8");
    }

    private static int? blocksPerSm =
        int.TryParse(Environment.GetEnvironmentVariable("LORAHUB_DOWN_RESIDUAL_BLOCKS"), out var b) && b is >= 1 and <= 8 ? b : null;

    /// <summary>
    /// Blocks of 256 threads that run at once per multiprocessor: the kernels' register caps (__launch_bounds__ below),
    /// 2 up to rank 16 (121 registers on sm_90), 1 above (B's fragments take 16 registers more per 16 ranks).
    /// </summary>
    public static int Resident(long rank) => rank <= 16 ? 2 : 1;

    /// <summary>Why the kernel is off after a failed compile (null: it compiled, or was not tried).</summary>
    public static string? CompileFailure => program.CompileFailure;

    /// <summary>One line for logs and benchmarks: launches so far, or why the kernel is off.</summary>
    public static string Report =>
        !Enabled ? "off (LORAHUB_DOWN_RESIDUAL_EPILOGUE=0)"
        : CompileFailure is { } why ? $"off (did not compile: {why})"
        : $"{Launches} launches";

    /// <summary>
    /// Tests only: the kernel compiled from <paramref name="source"/> instead (e.g. one that does not compile), until the
    /// returned object is disposed.
    /// </summary>
    internal static IDisposable UseSource(string source)
    {
        var before = program;
        program = new CudaProgram("lora_down_residual_test.cu", source);
        return new Restore(() => program = before);
    }

    private sealed class Restore(Action undo) : IDisposable
    {
        public void Dispose() => undo();
    }

    /// <summary>
    /// True when <see cref="Forward"/> takes the base product <paramref name="y"/> (tokens × n) with residual
    /// <paramref name="residual"/>, thin product <paramref name="xa"/> and <paramref name="b"/> (null: no update) and
    /// row scale <paramref name="c"/> (null: none): CUDA (sm_80+), bf16 or fp16, y and the residual contiguous of one
    /// shape and dtype and 16-byte aligned, n a multiple of 8, xa (tokens × r) and B (n × r) contiguous in y's dtype with
    /// r even and at most <see cref="MaxRank"/>, c a float vector of n on y's device, no bias, at least an update or a
    /// scale (else the add alone is one tensor op), and the kernel compiles.
    /// </summary>
    public static bool Applies(Tensor y, Tensor residual, Tensor? xa, Tensor? b, Tensor? c, Tensor? bias) =>
        Enabled && bias is null && (b is not null || c is not null) && Usable(y)
        && y.dtype is ScalarType.BFloat16 or ScalarType.Float16 && y.dim() == 2 && y.numel() > 0 && y.size(1) % 8 == 0
        && y.is_contiguous() && Aligned16(Ptr(y))
        && residual.dtype == y.dtype && residual.shape.SequenceEqual(y.shape) && residual.is_contiguous() && Aligned16(Ptr(residual))
        && SameDevice(residual, y)
        && (b is null || UpdateFits(y, xa, b))
        && (c is null || c.dim() == 1 && c.size(0) == y.size(1) && Supported(c.dtype) && SameDevice(c, y))
        && CudaKernels.ComputeCapability(DeviceIndex(y)) >= 80 // bf16 mma and paired conversions
        && program.Compiles(DeviceIndex(y), "the LoRA MLP adds its update, row scale and residual by tensor ops instead");

    private static bool UpdateFits(Tensor y, Tensor? xa, Tensor b)
    {
        if (xa is null || xa.dim() != 2 || b.dim() != 2) return false;
        var rank = xa.size(1);
        return rank > 0 && rank <= MaxRank && rank % 2 == 0 && xa.size(0) == y.size(0) && b.size(0) == y.size(1) && b.size(1) == rank
            && xa.dtype == y.dtype && b.dtype == y.dtype && xa.is_contiguous() && b.is_contiguous()
            && ((long)Ptr(xa) & 3) == 0 && ((long)Ptr(b) & 3) == 0 && SameDevice(xa, y) && SameDevice(b, y);
    }

    /// <summary>
    /// out = residual + c ⊙ (y + s·xa·Bᵀ) (a new tensor, y's shape and dtype; c null: 1; xa, B null: no update). With
    /// <paramref name="keepScaled"/> c ⊙ (y + s·xa·Bᵀ) rounded to y's dtype is written over y (for c's gradient). Call
    /// only where <see cref="Applies"/>. Null (nothing launched, y untouched) where the driver refused to load the
    /// compiled kernel: the caller takes the tensor ops.
    /// </summary>
    public static Tensor? Forward(Tensor y, Tensor residual, Tensor? xa, Tensor? b, double scaling, Tensor? c, bool keepScaled)
    {
        using var scope = NewDisposeScope();
        long rows = y.size(0), cols = y.size(1);
        var rank = b is null ? 0 : (int)xa!.size(1);
        var ks = (rank + 15) / 16;
        var c32 = c is null ? null : c.dtype == ScalarType.Float32 && c.is_contiguous() ? c : c.to(ScalarType.Float32).contiguous();
        var output = empty_like(y);
        var device = DeviceIndex(y);
        // Blocks of 8 warps × 64 columns; as many blocks down the 16-token tiles as run at once (each warp loads its B
        // fragments once, then walks its tiles).
        var xBlocks = (cols + 511) / 512;
        var rowTiles = (rows + 15) / 16;
        var yBlocks = Math.Clamp((long)(blocksPerSm ?? Resident(rank)) * CudaKernels.MultiprocessorCount(device) / xBlocks, 1,
            Math.Min(rowTiles, 65535));
        CudaFunction kernel;
        try
        {
            kernel = program.Function(device, $"lh_down_residual_{Suffix(y.dtype)}_k{ks}");
        }
        catch (KernelCompileException)
        {
            return null;
        }
        kernel.Launch(new Dim3((uint)xBlocks, (uint)yBlocks), Threads, 0,
                new KernelArgs().Ptr(Ptr(y)).Ptr(Ptr(residual)).Ptr(xa is null || b is null ? IntPtr.Zero : Ptr(xa))
                    .Ptr(b is null ? IntPtr.Zero : Ptr(b)).I32(rank).F32((float)scaling).Ptr(c32 is null ? IntPtr.Zero : Ptr(c32))
                    .Ptr(Ptr(output)).Ptr(keepScaled ? Ptr(y) : IntPtr.Zero).I64(rows).I64(cols));
        Interlocked.Increment(ref launches);
        return output.MoveToOuterDisposeScope();
    }

    // Block: 8 warps side by side, warp w a strip of 64 columns (two groups of 32) from c0 = (blockIdx.x·8 + w)·64, walking
    // the 16-token tiles blockIdx.y, blockIdx.y + gridDim.y, … Lane l: gid = l / 4, tig = l % 4. In the mma of n-tile q
    // (q = 0..3) of a group, column n stands for group column 8·(n / 2) + 2q + n % 2, so the accumulators of lane l (PTX ISA
    // m16n8k16: c0, c1 at row gid, columns 2·tig, 2·tig + 1; c2, c3 at row gid + 8) are the group's columns 8·tig ..
    // 8·tig + 7 at tokens gid and gid + 8 of the tile: the 8 elements the lane reads and writes with one 16-byte access per
    // token. B's fragments (rank k-steps × 2 groups × 4 n-tiles × 2 words) stay in registers; xa's are read per tile (the
    // same 16 tokens for the block's 8 warps: L1).
    private const string Source = """
        #include "lh_common.cuh"
        #include "lh_mma.cuh"             // Mma<T>::run (mma.m16n8k16, fp32 accumulate), W8 (16-byte packs), Unpack, pack8
        #include "lh_lowrank_epilogue.cuh" // lowrank_epilogue: c·(y + s·dot) in fp32

        __device__ __forceinline__ W8 load8(const void* p, i64 at, bool in) {
          W8 v = {{0u, 0u, 0u, 0u}};
          if (in) v = reinterpret_cast<const W8*>(p)[at];
          return v;
        }

        // One 16-byte store (st.global.v4: a struct store may be split into four).
        __device__ __forceinline__ void store8(void* p, i64 at, const W8& v) {
          asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(reinterpret_cast<W8*>(p) + at), "r"(v.w[0]), "r"(v.w[1]),
                       "r"(v.w[2]), "r"(v.w[3])
                       : "memory");
        }

        // Two consecutive 16-bit elements as one 32-bit word, the lower-indexed in the low half (the fragments' order).
        __device__ __forceinline__ u32 load_pair(const u16* p, i64 at, bool in) { return in ? *reinterpret_cast<const u32*>(p + at) : 0u; }

        // scaled may be y's memory (c ⊙ inner written over y), so no __restrict__ on those two.
        template <typename T, int KS>
        __device__ __forceinline__ void down_residual(const T* y, const T* __restrict__ res, const T* __restrict__ xa,
                                                      const T* __restrict__ b, int rank, float s, const float* __restrict__ c,
                                                      T* __restrict__ out, T* scaled, i64 rows, i64 cols) {
          const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
          const int gid = lane >> 2, tig = lane & 3;
          const i64 c0 = (static_cast<i64>(blockIdx.x) * 8 + warp) * 64;
          if (c0 >= cols) return;  // the whole warp: no column of its strip exists (no barrier below)
          const i64 nv = cols / 8;  // 16-byte packs per row
          // B's fragments: k-step k, group g, n-tile q, word 0 (ranks 16k + 2·tig, +1) and 1 (+8, +9) of B's row
          // c0 + 32g + 8·(gid / 2) + 2q + gid % 2; zero past the rank and the columns.
          u32 bf[KS > 0 ? KS : 1][2][4][2];
          const u16* bw = reinterpret_cast<const u16*>(b);
        #pragma unroll
          for (int k = 0; k < KS; k++) {
        #pragma unroll
            for (int g = 0; g < 2; g++) {
        #pragma unroll
              for (int q = 0; q < 4; q++) {
                const i64 j = c0 + 32 * g + 8 * (gid >> 1) + 2 * q + (gid & 1);
                const int r = 16 * k + 2 * tig;
                bf[k][g][q][0] = load_pair(bw, j * rank + r, j < cols && r < rank);
                bf[k][g][q][1] = load_pair(bw, j * rank + r + 8, j < cols && r + 8 < rank);
              }
            }
          }
          // The lane's columns of each group, whether they exist, and their row scales (1 without).
          i64 jc[2];
          bool colIn[2];
          float cc[2][8];
        #pragma unroll
          for (int g = 0; g < 2; g++) {
            jc[g] = c0 + 32 * g + 8 * tig;
            colIn[g] = jc[g] < cols;
        #pragma unroll
            for (int e = 0; e < 8; e++) cc[g][e] = c != nullptr && colIn[g] ? c[jc[g] + e] : 1.f;
          }
          const u16* xw = reinterpret_cast<const u16*>(xa);
          for (i64 m0 = static_cast<i64>(blockIdx.y) * 16; m0 < rows; m0 += static_cast<i64>(gridDim.y) * 16) {
            const i64 r0 = m0 + gid, r1 = r0 + 8;
            const bool in0 = r0 < rows, in1 = r1 < rows;
            // The tile's y and residual first (16-byte packs; [group][token half]): their loads in flight during the mma.
            W8 yv[2][2], hv[2][2];
        #pragma unroll
            for (int g = 0; g < 2; g++) {
        #pragma unroll
              for (int hf = 0; hf < 2; hf++) {
                const bool in = colIn[g] && (hf ? in1 : in0);
                const i64 at = (hf ? r1 : r0) * nv + jc[g] / 8;
                yv[g][hf] = load8(y, at, in);
                hv[g][hf] = load8(res, at, in);
              }
            }
            float acc[2][4][4];
        #pragma unroll
            for (int g = 0; g < 2; g++) {
        #pragma unroll
              for (int q = 0; q < 4; q++) {
        #pragma unroll
                for (int i = 0; i < 4; i++) acc[g][q][i] = 0.f;
              }
            }
        #pragma unroll
            for (int k = 0; k < KS; k++) {
              const int r = 16 * k + 2 * tig;
              u32 a[4];
              a[0] = load_pair(xw, r0 * rank + r, in0 && r < rank);
              a[1] = load_pair(xw, r1 * rank + r, in1 && r < rank);
              a[2] = load_pair(xw, r0 * rank + r + 8, in0 && r + 8 < rank);
              a[3] = load_pair(xw, r1 * rank + r + 8, in1 && r + 8 < rank);
        #pragma unroll
              for (int g = 0; g < 2; g++) {
        #pragma unroll
                for (int q = 0; q < 4; q++) Mma<T>::run(acc[g][q], a, bf[k][g][q][0], bf[k][g][q][1]);
              }
            }
        #pragma unroll
            for (int g = 0; g < 2; g++) {
        #pragma unroll
              for (int hf = 0; hf < 2; hf++) {
                if (!(colIn[g] && (hf ? in1 : in0))) continue;
                const i64 at = (hf ? r1 : r0) * nv + jc[g] / 8;
                float v[8], o[8];
        #pragma unroll
                for (int e = 0; e < 8; e++) {
                  v[e] = lowrank_epilogue(Unpack<T>::at(yv[g][hf], e), acc[g][e >> 1][2 * hf + (e & 1)], s, cc[g][e]);
                  o[e] = Unpack<T>::at(hv[g][hf], e) + v[e];
                }
                store8(out, at, pack8<T>(o));
                if (scaled != nullptr) store8(scaled, at, pack8<T>(v));
              }
            }
          }
        }

        #define LH_DOWN_RESIDUAL(T, S, K)                                                                                  \
          extern "C" __global__ void __launch_bounds__(256, (K) <= 1 ? 2 : 1)                                             \
              lh_down_residual_##S##_k##K(const T* y, const T* res, const T* xa, const T* b, int rank, float s,            \
                                          const float* c, T* out, T* scaled, i64 rows, i64 cols) { lh_grid_dependency_sync();                         \
            down_residual<T, K>(y, res, xa, b, rank, s, c, out, scaled, rows, cols);                                      \
          }

        #define LH_DOWN_RESIDUAL_ALL(T, S) \
          LH_DOWN_RESIDUAL(T, S, 0)        \
          LH_DOWN_RESIDUAL(T, S, 1)        \
          LH_DOWN_RESIDUAL(T, S, 2)        \
          LH_DOWN_RESIDUAL(T, S, 3)        \
          LH_DOWN_RESIDUAL(T, S, 4)

        LH_DOWN_RESIDUAL_ALL(bf16, bf16)
        LH_DOWN_RESIDUAL_ALL(f16, f16)
        """;
}
