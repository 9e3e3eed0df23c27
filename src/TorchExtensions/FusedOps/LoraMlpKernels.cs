using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// CUDA kernels for the fused LoRA MLP (<see cref="LoraMlpFunction"/>) that add the gate, up and down low-rank updates
/// inside the gated activation, so none of them is a separate pass over a tokens × intermediate tensor:
/// <list type="bullet">
/// <item>Forward: h = act(G)·U from the base GEMM outputs g, u with G = g + s_g·xa_g·B_gᵀ, U = u + s_u·xa_u·B_uᵀ (xa: the
/// thin x·[A_g; A_u]ᵀ). G and U are never written: g and u are saved without their updates.</item>
/// <item>Backward: D = dh + dxa_d·A_d (dh = dy·W_dᵀ, dxa_d = s_d·dy·B_d), G and U recomputed as in forward; writes
/// dG, dU (the gradients of g and u too) and, where A_d needs its gradient, h for dA_d = dxa_dᵀ·h. Outputs may be the
/// inputs' memory: every element is read and written by one thread (the launcher writes dG over dh, dU over u, h over g).</item>
/// <item>Row scales c_g, c_u (DoRA; taken where <see cref="FoldRowScales"/>): G, U scaled on load and rounded as
/// <see cref="LoraRowScaleKernels"/>' SwiGLU does; backward gives c ⊙ dG, c ⊙ dU and the scales' gradients Σ_tokens dG ⊙ G
/// (per token tile in the kernel, then a column reduce).</item>
/// </list>
/// The sums run in fp32 and G, U, D are rounded to the activations' dtype, as the composite path's addmm leaves them; act,
/// act(G)·U and the gradients round as the SwiGLU kernels (and <see cref="LoraGatedActivation"/>) do. A block computes a
/// tile of (32·M tokens × 64 columns): the rank is staged in chunks of 32 in shared memory (fp32), each thread keeps an
/// M × 8 register tile, so a B row and an xa row are read once per tile, not per element. Activations: silu,
/// gelu_pytorch_tanh / gelu_new, gelu. CUDA only (fp32, fp16, bf16), each update's rank up to <see cref="MaxRank"/>;
/// LORAHUB_LORA_MLP_KERNEL=0 turns them off (the addmm path then). A compile failure turns only these off.
/// </summary>
internal static class LoraMlpKernels
{
    /// <summary>Largest rank per projection taken: beyond it the FMAs (rank per element) cost more than the addmm GEMM.</summary>
    public const long MaxRank = 64;

    private static readonly CudaProgram program = new("lora_mlp_lowrank.cu", Source);

    private static long launches;

    /// <summary>Forward and backward launches so far (tests: a silent fallback must not pass).</summary>
    public static long Launches => Interlocked.Read(ref launches);

    /// <summary>Whether the kernels may be used (default on; LORAHUB_LORA_MLP_KERNEL=0: off).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL")?.Trim() != "0";

    /// <summary>Why the kernels are off after a failed compile (null: they compiled, or were not tried).</summary>
    public static string? CompileFailure { get; private set; }

    // Tokens per thread (a tile is 32·M tokens): forward 4, backward 2 (it holds three register tiles).
    // LORAHUB_LORA_MLP_TILE="fwd,bwd" (each 2 or 4) for tuning runs.
    private static readonly (int fwd, int bwd) tile = ParseTile(Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_TILE"));

    private static (int, int) ParseTile(string? spec)
    {
        var parts = (spec ?? "").Split(',', StringSplitOptions.TrimEntries);
        static int M(string s, int fallback) => s is "2" or "4" ? int.Parse(s) : fallback;
        return parts.Length == 2 ? (M(parts[0], 4), M(parts[1], 2)) : (4, 2);
    }

    /// <summary>The kernels' activation code, or -1.</summary>
    private static int ActivationCode(string activation) => activation switch
    {
        "silu" => 0,
        "gelu_pytorch_tanh" or "gelu_new" => 1,
        "gelu" => 2,
        _ => -1,
    };

    /// <summary>
    /// True when the kernels take the gated activation over the gate and up base outputs g, u (contiguous 2-D CUDA tensors
    /// of one dtype and shape) with updates of these ranks (0: none). They follow <see cref="torchx.nn.functional.Fused.SwiGlu"/>
    /// too (the gated-activation kernels' switch).
    /// </summary>
    public static bool Applies(string activation, Tensor g, Tensor u, long rankGate, long rankUp, long rankDown) =>
        Enabled && torchx.nn.functional.Fused.SwiGlu && ActivationCode(activation) >= 0 && Usable(g) && g.dim() == 2 && g.numel() > 0 && g.is_contiguous()
        && u.is_contiguous() && u.dtype == g.dtype && u.shape.SequenceEqual(g.shape)
        && rankGate <= MaxRank && rankUp <= MaxRank && rankDown <= MaxRank && Compiles(DeviceIndex(g));

    private static readonly Dictionary<int, bool> compiles = new();

    // Compiled once per architecture before first use, outside CudaProgram (where a compile error would turn every
    // LoRAHub kernel off); the image goes to the kernel cache, so the program's own load does not compile again.
    private static bool Compiles(int device)
    {
        lock (compiles)
        {
            var arch = CudaKernels.ComputeCapability(device);
            if (compiles.TryGetValue(arch, out var ok)) return ok;
            try
            {
                var key = KernelCache.Key(program.Name, Source, CudaKernels.Headers, arch, []);
                if (KernelCache.Load(key) is null) KernelCache.Store(key, Nvrtc.Compile(program.Name, Source, CudaKernels.Headers, arch, []));
                ok = true;
            }
            catch (Exception e)
            {
                CompileFailure = $"{program.Name}: {e.Message}";
                Console.Error.WriteLine($"LoRAHub: {program.Name} did not compile; the LoRA MLP adds its updates by addmm instead ({e.Message})");
                ok = false;
            }
            return compiles[arch] = ok;
        }
    }

    /// <summary>
    /// Whether the kernels also take gate/up row scales (DoRA, y = c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ)) in place of
    /// <see cref="LoraRowScaleKernels"/>' SwiGLU and the addmm passes: LORAHUB_LORA_MLP_KERNEL_DORA=1 (off by default until
    /// measured on the GPU), and only while the row-scale kernels are on.
    /// </summary>
    public static bool FoldRowScales { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LORA_MLP_KERNEL_DORA")?.Trim() == "1";

    // The gate/up arguments: xa (tokens × (r_g + r_u), unit column stride, row stride ld; up's columns after gate's), then
    // per projection its rank, B (F × r: element (j, k) at j·stride(0) + k·stride(1)) and B's strides. A null B: rank 0.
    private static KernelArgs GateUp(KernelArgs a, Tensor? xa, Tensor? bGate, Tensor? bUp)
    {
        static KernelArgs B(KernelArgs a, Tensor? b) =>
            b is null ? a.I32(0).Ptr(IntPtr.Zero).I64(0).I64(0) : a.I32((int)b.size(1)).Ptr(Ptr(b)).I64(b.stride(0)).I64(b.stride(1));
        if (xa is null || (bGate is null && bUp is null)) return B(B(a.Ptr(IntPtr.Zero).I64(0), null), null);
        if (xa.dim() != 2 || xa.stride(1) != 1) throw new ArgumentException("xa must be a 2-D tensor with unit column stride");
        return B(B(a.Ptr(Ptr(xa)).I64(xa.stride(0)), bGate), bUp);
    }

    private static int Grid(long rows, long cols, int m) => checked((int)(((cols + 63) / 64) * ((rows + 32 * m - 1) / (32 * m))));

    // 8 columns per thread as one access where every row starts aligned (Pack<T, 8>: 16 bytes for 16-bit types, 32 for fp32).
    private static int Vector(Tensor g, params Tensor?[] others)
    {
        var bytes = 8 * g.element_size();
        bool Aligned(Tensor? t) => t is null || (long)Ptr(t) % bytes == 0;
        return g.size(1) % 8 == 0 && Aligned(g) && others.All(Aligned) ? 1 : 0;
    }

    private static Tensor? F32(Tensor? c) => c is null ? null : c.to(ScalarType.Float32).contiguous();

    private static IntPtr P(Tensor? t) => t is null ? IntPtr.Zero : Ptr(t);

    /// <summary>
    /// h = act(c_g ⊙ (g + s_g·xa[:, :r_g]·B_gᵀ)) · (c_u ⊙ (u + s_u·xa[:, r_g:]·B_uᵀ)) for base outputs g, u (tokens × F) and
    /// xa (tokens × (r_g + r_u)); a null B (rank 0) is no update, a null row scale c is 1. B's in the activations' dtype.
    /// Call only where <see cref="Applies"/>.
    /// </summary>
    public static Tensor Forward(string activation, Tensor g, Tensor u, Tensor? xa, Tensor? bGate, Tensor? bUp, double scaleGate, double scaleUp,
        Tensor? cGate = null, Tensor? cUp = null)
    {
        using var scope = NewDisposeScope();
        long rows = g.size(0), cols = g.size(1);
        var h = empty_like(g);
        var (cg, cu) = (F32(cGate), F32(cUp));
        var m = tile.fwd;
        var args = GateUp(new KernelArgs().Ptr(Ptr(g)).Ptr(Ptr(u)), xa, bGate, bUp)
            .F32((float)scaleGate).F32((float)scaleUp).Ptr(P(cg)).Ptr(P(cu)).Ptr(Ptr(h))
            .I64(rows).I64(cols).I32(ActivationCode(activation)).I32(Vector(g, u, h));
        program.Function(DeviceIndex(g), $"lh_lora_mlp_fwd_{Suffix(g.dtype)}_m{m}").Launch(Grid(rows, cols, m), new Dim3(8, 32), 0, args);
        Interlocked.Increment(ref launches);
        return h.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Backward of <see cref="Forward"/> followed by down: from dh = dy·W_dᵀ (tokens × F, ours: overwritten), the down
    /// update's dxa_d = s_d·dy·B_d (tokens × r_d, null: none) and A_d (r_d × F), with D = dh + dxa_d·A_d: the gradients of
    /// g and u (in dh's and u's memory), with <paramref name="wantH"/> h = act(G)·U (in g's memory), and the row scales'
    /// gradients (fp32; null for a null scale). g and u are consumed: the caller must not read them afterwards. Call only
    /// where <see cref="Applies"/>.
    /// </summary>
    public static (Tensor dg, Tensor du, Tensor? h, Tensor? dcGate, Tensor? dcUp) Backward(string activation, Tensor dh, Tensor? dxaDown, Tensor? aDown,
        Tensor g, Tensor u, Tensor? xa, Tensor? bGate, Tensor? bUp, double scaleGate, double scaleUp, bool wantH, Tensor? cGate = null, Tensor? cUp = null)
    {
        if (!dh.is_contiguous() || dh.dtype != g.dtype || !dh.shape.SequenceEqual(g.shape)) throw new ArgumentException("dh must be contiguous, of g's dtype and shape");
        if (dxaDown is not null && (dxaDown.dim() != 2 || dxaDown.stride(1) != 1)) throw new ArgumentException("dxa_down must have unit column stride");
        using var scope = NewDisposeScope();
        long rows = g.size(0), cols = g.size(1);
        var m = tile.bwd;
        var tokenTiles = (int)((rows + 32 * m - 1) / (32 * m));
        var (cg, cu) = (F32(cGate), F32(cUp));
        var pg = cg is null ? null : empty([tokenTiles, cols], ScalarType.Float32, g.device);
        var pu = cu is null ? null : empty([tokenTiles, cols], ScalarType.Float32, g.device);
        var args = new KernelArgs().Ptr(Ptr(dh));
        // A_d (r_d × F): element (j, k) = A_d[k, j].
        if (dxaDown is null || aDown is null) args.Ptr(IntPtr.Zero).I64(0).I32(0).Ptr(IntPtr.Zero).I64(0).I64(0);
        else args.Ptr(Ptr(dxaDown)).I64(dxaDown.stride(0)).I32((int)aDown.size(0)).Ptr(Ptr(aDown)).I64(aDown.stride(1)).I64(aDown.stride(0));
        GateUp(args.Ptr(Ptr(g)).Ptr(Ptr(u)), xa, bGate, bUp)
            .F32((float)scaleGate).F32((float)scaleUp).Ptr(P(cg)).Ptr(P(cu)).Ptr(P(pg)).Ptr(P(pu))
            // In place: dG over dh, dU over u, h over g.
            .Ptr(Ptr(dh)).Ptr(Ptr(u)).Ptr(wantH ? Ptr(g) : IntPtr.Zero)
            .I64(rows).I64(cols).I32(ActivationCode(activation)).I32(Vector(g, u, dh));
        var device = DeviceIndex(g);
        program.Function(device, $"lh_lora_mlp_bwd_{Suffix(g.dtype)}_m{m}").Launch(Grid(rows, cols, m), new Dim3(8, 32), 0, args);
        Tensor? Reduce(Tensor? partial)
        {
            if (partial is null) return null;
            var sum = empty([cols], ScalarType.Float32, partial.device);
            program.Function(device, "lh_lora_mlp_col_reduce")
                .Launch((int)((cols + 31) / 32), new Dim3(32, 8), 0, new KernelArgs().Ptr(Ptr(partial)).I32(tokenTiles).Ptr(Ptr(sum)).I64(cols));
            return sum.MoveToOuterDisposeScope();
        }
        var (dcg, dcu) = (Reduce(pg), Reduce(pu));
        Interlocked.Increment(ref launches);
        return (dh, u, wantH ? g : null, dcg, dcu);
    }

    // Block 8 × 32 threads: threadIdx.x picks 8 consecutive columns of a 64-column tile, threadIdx.y M consecutive tokens of
    // a 32·M-token tile; blockIdx.x numbers the tiles, column tiles fastest. Low-rank sums: the rank in chunks of 32, W's
    // chunk (64 columns, fp32) and xa's chunk (32·M tokens, fp32, k-major) in shared memory. W's row k holds column
    // 8·tx + 4·half + c at half·32 + 4·(tx ^ (k mod 8)) + c: each thread reads its 8 columns as two 16-byte words, the 8
    // threads of a row on distinct banks, and the staging writes (8 k × 4 columns per warp) are conflict-free too.
    private const string Source = """
        #include "lh_common.cuh"

        #define LM_TX 8
        #define LM_TY 32
        #define LM_TN 64
        #define LM_KC 32

        template <typename T>
        __device__ __forceinline__ void load8(const T* p, i64 row, i64 rows, i64 col, i64 cols, int vec, float (&v)[8]) {
          if (row >= rows || col >= cols) {
        #pragma unroll
            for (int c = 0; c < 8; c++) v[c] = 0.f;
            return;
          }
          const T* q = p + row * cols + col;
          if (vec) {
            const Pack<T, 8> pk = *reinterpret_cast<const Pack<T, 8>*>(q);
        #pragma unroll
            for (int c = 0; c < 8; c++) v[c] = Cvt<T>::to(pk.v[c]);
          } else {
        #pragma unroll
            for (int c = 0; c < 8; c++) v[c] = col + c < cols ? Cvt<T>::to(q[c]) : 0.f;
          }
        }

        template <typename T>
        __device__ __forceinline__ void store8(T* p, i64 row, i64 rows, i64 col, i64 cols, int vec, const float (&v)[8]) {
          if (row >= rows || col >= cols) return;
          T* q = p + row * cols + col;
          if (vec) {
            Pack<T, 8> pk;
        #pragma unroll
            for (int c = 0; c < 8; c++) pk.v[c] = Cvt<T>::from(v[c]);
            *reinterpret_cast<Pack<T, 8>*>(q) = pk;
          } else {
        #pragma unroll
            for (int c = 0; c < 8; c++)
              if (col + c < cols) q[c] = Cvt<T>::from(v[c]);
          }
        }

        // acc[m][c] = Σ_k xa[t0 + ty·M + m, k] · W(j0 + 8·tx + c, k) for k < rank, W(j, k) at w[j·wj + k·wk]. Every thread of
        // the block calls it (barriers inside).
        template <typename T, int M>
        __device__ __forceinline__ void lowrank(float (&acc)[M][8], const T* xa, i64 ldx, int rank, const T* w, i64 wj, i64 wk,
                                                i64 t0, i64 rows, i64 j0, i64 cols, float* bs, float* xs) {
          constexpr int TM = LM_TY * M;
          constexpr int XS = TM + 4;
          const int tid = threadIdx.y * LM_TX + threadIdx.x;
        #pragma unroll
          for (int m = 0; m < M; m++)
        #pragma unroll
            for (int c = 0; c < 8; c++) acc[m][c] = 0.f;
          for (int k0 = 0; k0 < rank; k0 += LM_KC) {
            const int kc = rank - k0 < LM_KC ? rank - k0 : LM_KC;
            __syncthreads();  // the previous chunk's (or tile part's) readers are done
            for (int i = tid; i < LM_TN * LM_KC; i += LM_TX * LM_TY) {
              int j, k;
              if (wk == 1) {  // a warp reads 8 consecutive k of 4 rows (B: cols × rank)
                k = (i / (8 * LM_TN)) * 8 + i % 8;
                j = (i / 8) % LM_TN;
              } else {  // consecutive j (A: rank × cols)
                j = i % LM_TN;
                k = i / LM_TN;
              }
              float v = 0.f;
              if (k < kc && j0 + j < cols) v = Cvt<T>::to(w[(j0 + j) * wj + static_cast<i64>(k0 + k) * wk]);
              bs[k * LM_TN + ((j >> 2) & 1) * 32 + (((j >> 3) ^ (k & 7)) << 2) + (j & 3)] = v;
            }
            for (int i = tid; i < TM * LM_KC; i += LM_TX * LM_TY) {  // a warp: 8 consecutive k of 4 tokens
              const int k = (i / (8 * TM)) * 8 + i % 8, t = (i / 8) % TM;
              float v = 0.f;
              if (k < kc && t0 + t < rows) v = Cvt<T>::to(xa[(t0 + t) * ldx + k0 + k]);
              xs[k * XS + t] = v;
            }
            __syncthreads();
        #pragma unroll 4
            for (int k = 0; k < kc; k++) {
              const int at = k * LM_TN + ((threadIdx.x ^ (k & 7)) << 2);
              const Pack<float, 4> b0 = *reinterpret_cast<const Pack<float, 4>*>(bs + at);
              const Pack<float, 4> b1 = *reinterpret_cast<const Pack<float, 4>*>(bs + at + 32);
              const Pack<float, M> xv = *reinterpret_cast<const Pack<float, M>*>(xs + k * XS + threadIdx.y * M);
        #pragma unroll
              for (int m = 0; m < M; m++) {
        #pragma unroll
                for (int c = 0; c < 4; c++) {
                  acc[m][c] = fmaf(xv.v[m], b0.v[c], acc[m][c]);
                  acc[m][4 + c] = fmaf(xv.v[m], b1.v[c], acc[m][4 + c]);
                }
              }
            }
          }
        }

        // v[m][c] ← round_T(v + s·Σ_k xa·W) (the composite path's addmm, rounded once to the activations' dtype).
        template <typename T, int M>
        __device__ __forceinline__ void add_update(float (&v)[M][8], float s, const T* xa, i64 ldx, int rank, const T* w, i64 wj,
                                                   i64 wk, i64 t0, i64 rows, i64 j0, i64 cols, float* bs, float* xs) {
          float acc[M][8];
          lowrank<T, M>(acc, xa, ldx, rank, w, wj, wk, t0, rows, j0, cols, bs, xs);
        #pragma unroll
          for (int m = 0; m < M; m++)
        #pragma unroll
            for (int c = 0; c < 8; c++) v[m][c] = round_to<T>(fmaf(s, acc[m][c], v[m][c]));
        }

        // act(x) and act'(x): 0 silu, 1 gelu (tanh approximation), 2 gelu (erf).
        __device__ __forceinline__ float gate_act(int act, float x, float* dact) {
          if (act == 0) {
            const float s = lh_sigmoid(x);
            if (dact != nullptr) *dact = s * (1.f + x * (1.f - s));
            return x * s;
          }
          if (act == 1) {
            const float k = 0.7978845608028654f, c = 0.044715f;
            const float t = tanhf(k * (x + c * x * x * x));
            if (dact != nullptr) *dact = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * k * (1.f + 3.f * c * x * x);
            return 0.5f * x * (1.f + t);
          }
          const float cdf = 0.5f * (1.f + erff(x * 0.7071067811865476f));
          if (dact != nullptr) *dact = cdf + x * expf(-0.5f * x * x) * 0.3989422804014327f;
          return x * cdf;
        }

        // The row scale c (null: 1) of the thread's 8 columns.
        __device__ __forceinline__ void load_scale(const float* c, i64 col, i64 cols, float (&v)[8]) {
        #pragma unroll
          for (int k = 0; k < 8; k++) v[k] = c != nullptr && col + k < cols ? c[col + k] : 1.f;
        }

        template <typename T, int M>
        __device__ __forceinline__ void mlp_forward(const T* g, const T* u, const T* xg, i64 ldg, int rg, const T* bg, i64 bgj,
                                                    i64 bgk, const T* xu, i64 ldu, int ru, const T* bu, i64 buj, i64 buk, float sg,
                                                    float su, const float* cg, const float* cu, T* h, i64 rows, i64 cols, int act,
                                                    int vec) {
          __shared__ Pack<float, 4> bs4[LM_KC * LM_TN / 4];  // Pack: 16-byte aligned for the float4 reads
          __shared__ Pack<float, 4> xs4[LM_KC * (LM_TY * M + 4) / 4];
          float* bs = reinterpret_cast<float*>(bs4);
          float* xs = reinterpret_cast<float*>(xs4);
          const i64 colTiles = (cols + LM_TN - 1) / LM_TN;
          const i64 j0 = (static_cast<i64>(blockIdx.x) % colTiles) * LM_TN;
          const i64 t0 = (static_cast<i64>(blockIdx.x) / colTiles) * (LM_TY * M);
          const i64 jc = j0 + threadIdx.x * 8;
          const i64 r0 = t0 + threadIdx.y * M;
          float G[M][8], U[M][8];
        #pragma unroll
          for (int m = 0; m < M; m++) {
            load8<T>(g, r0 + m, rows, jc, cols, vec, G[m]);
            load8<T>(u, r0 + m, rows, jc, cols, vec, U[m]);
          }
          if (rg > 0) add_update<T, M>(G, sg, xg, ldg, rg, bg, bgj, bgk, t0, rows, j0, cols, bs, xs);
          if (ru > 0) add_update<T, M>(U, su, xu, ldu, ru, bu, buj, buk, t0, rows, j0, cols, bs, xs);
          float kg[8], ku[8];
          load_scale(cg, jc, cols, kg);
          load_scale(cu, jc, cols, ku);
        #pragma unroll
          for (int m = 0; m < M; m++) {
            float o[8];
        #pragma unroll
            for (int c = 0; c < 8; c++) {
              // The row-scaled outputs rounded as the in-place scaling of the tensor ops leaves them (a null scale: exact).
              const float Gs = round_to<T>(kg[c] * G[m][c]), Us = round_to<T>(ku[c] * U[m][c]);
              o[c] = round_to<T>(gate_act(act, Gs, nullptr)) * Us;
            }
            store8<T>(h, r0 + m, rows, jc, cols, vec, o);
          }
        }

        // Outputs may alias inputs (dg = dh, du = u, h = g): each element is read, then written, by one thread.
        template <typename T, int M>
        __device__ __forceinline__ void mlp_backward(const T* dh, const T* xd, i64 ldd, int rd, const T* ad, i64 adj, i64 adk,
                                                     const T* g, const T* u, const T* xg, i64 ldg, int rg, const T* bg, i64 bgj,
                                                     i64 bgk, const T* xu, i64 ldu, int ru, const T* bu, i64 buj, i64 buk, float sg,
                                                     float su, const float* cg, const float* cu, float* pg, float* pu, T* dg, T* du,
                                                     T* h, i64 rows, i64 cols, int act, int vec) {
          __shared__ Pack<float, 4> bs4[LM_KC * LM_TN / 4];  // Pack: 16-byte aligned for the float4 reads
          __shared__ Pack<float, 4> xs4[LM_KC * (LM_TY * M + 4) / 4];
          __shared__ float red[LM_TY / 4][2][LM_TN];  // the row scales' partial sums of the block's 8 warps
          float* bs = reinterpret_cast<float*>(bs4);
          float* xs = reinterpret_cast<float*>(xs4);
          const i64 colTiles = (cols + LM_TN - 1) / LM_TN;
          const i64 j0 = (static_cast<i64>(blockIdx.x) % colTiles) * LM_TN;
          const i64 t0 = (static_cast<i64>(blockIdx.x) / colTiles) * (LM_TY * M);
          const i64 jc = j0 + threadIdx.x * 8;
          const i64 r0 = t0 + threadIdx.y * M;
          float D[M][8], G[M][8], U[M][8];
        #pragma unroll
          for (int m = 0; m < M; m++) {
            load8<T>(dh, r0 + m, rows, jc, cols, vec, D[m]);
            load8<T>(g, r0 + m, rows, jc, cols, vec, G[m]);
            load8<T>(u, r0 + m, rows, jc, cols, vec, U[m]);
          }
          if (rd > 0) add_update<T, M>(D, 1.f, xd, ldd, rd, ad, adj, adk, t0, rows, j0, cols, bs, xs);
          if (rg > 0) add_update<T, M>(G, sg, xg, ldg, rg, bg, bgj, bgk, t0, rows, j0, cols, bs, xs);
          if (ru > 0) add_update<T, M>(U, su, xu, ldu, ru, bu, buj, buk, t0, rows, j0, cols, bs, xs);
          // With row scales (as LoraRowScaleKernels' SwiGLU backward): Gs = c_g ⊙ G, Us = c_u ⊙ U rounded; dGs, dUs rounded;
          // the unscaled G, U get c ⊙ dGs, c ⊙ dUs and the scales Σ_tokens dGs ⊙ G, Σ_tokens dUs ⊙ U (without scales the
          // same formulas with c = 1 round each gradient once).
          float kg[8], ku[8], ag[8], au[8];
          load_scale(cg, jc, cols, kg);
          load_scale(cu, jc, cols, ku);
        #pragma unroll
          for (int c = 0; c < 8; c++) ag[c] = au[c] = 0.f;
        #pragma unroll
          for (int m = 0; m < M; m++) {
            float og[8], ou[8], oh[8];
        #pragma unroll
            for (int c = 0; c < 8; c++) {
              const float Gs = round_to<T>(kg[c] * G[m][c]), Us = round_to<T>(ku[c] * U[m][c]);
              float dact;
              const float a = round_to<T>(gate_act(act, Gs, &dact));
              const float dUs = round_to<T>(D[m][c] * a);
              const float dGs = round_to<T>(D[m][c] * Us * dact);
              ag[c] = fmaf(dGs, G[m][c], ag[c]);
              au[c] = fmaf(dUs, U[m][c], au[c]);
              og[c] = dGs * kg[c];
              ou[c] = dUs * ku[c];
              oh[c] = a * Us;
            }
            store8<T>(dg, r0 + m, rows, jc, cols, vec, og);
            store8<T>(du, r0 + m, rows, jc, cols, vec, ou);
            if (h != nullptr) store8<T>(h, r0 + m, rows, jc, cols, vec, oh);
          }
          if (pg == nullptr && pu == nullptr) return;  // the same for the whole block: no thread waits at the barrier below
          // Σ over the block's tokens: the 4 thread rows of a warp by shuffles (lanes 8 and 16 apart share columns), then
          // the 8 warps through shared memory; partial[token tile, column].
        #pragma unroll
          for (int c = 0; c < 8; c++) {
        #pragma unroll
            for (int o = 8; o < 32; o <<= 1) {
              ag[c] += __shfl_xor_sync(0xffffffffu, ag[c], o);
              au[c] += __shfl_xor_sync(0xffffffffu, au[c], o);
            }
          }
          if ((threadIdx.y & 3) == 0) {
        #pragma unroll
            for (int c = 0; c < 8; c++) {
              red[threadIdx.y >> 2][0][threadIdx.x * 8 + c] = ag[c];
              red[threadIdx.y >> 2][1][threadIdx.x * 8 + c] = au[c];
            }
          }
          __syncthreads();
          const int tid = threadIdx.y * LM_TX + threadIdx.x;
          if (tid < 2 * LM_TN) {
            const int which = tid / LM_TN, col = tid % LM_TN;
            float s = 0.f;
        #pragma unroll
            for (int w = 0; w < LM_TY / 4; w++) s += red[w][which][col];
            float* partial = which == 0 ? pg : pu;
            if (partial != nullptr && j0 + col < cols) partial[(t0 / (LM_TY * M)) * cols + j0 + col] = s;
          }
        }

        // out[j] = Σ_b partial[b, j] (block 32 × 8: 32 columns, 8 lanes over the partial rows).
        extern "C" __global__ void lh_lora_mlp_col_reduce(const float* __restrict__ partial, int blocks, float* __restrict__ out, i64 cols) {
          __shared__ float tile[8][33];
          const i64 j = static_cast<i64>(blockIdx.x) * 32 + threadIdx.x;
          float s = 0.f;
          if (j < cols) {
            for (int b = threadIdx.y; b < blocks; b += 8) s += partial[static_cast<i64>(b) * cols + j];
          }
          tile[threadIdx.y][threadIdx.x] = s;
          __syncthreads();
          if (threadIdx.y == 0 && j < cols) {
            float total = 0.f;
        #pragma unroll
            for (int i = 0; i < 8; i++) total += tile[i][threadIdx.x];
            out[j] = total;
          }
        }

        #define LH_LORA_MLP_ENTRIES(T, S, M)                                                                                  \
          extern "C" __global__ void __launch_bounds__(256) lh_lora_mlp_fwd_##S##_m##M(                                       \
              const T* g, const T* u, const T* xa, i64 ldx, int rg, const T* bg, i64 bgj, i64 bgk, int ru, const T* bu,       \
              i64 buj, i64 buk, float sg, float su, const float* cg, const float* cu, T* h, i64 rows, i64 cols, int act,      \
              int vec) {                                                                                                      \
            mlp_forward<T, M>(g, u, xa, ldx, rg, bg, bgj, bgk, xa + rg, ldx, ru, bu, buj, buk, sg, su, cg, cu, h, rows, cols,  \
                              act, vec);                                                                                      \
          }                                                                                                                   \
          extern "C" __global__ void __launch_bounds__(256) lh_lora_mlp_bwd_##S##_m##M(                                       \
              const T* dh, const T* xd, i64 ldd, int rd, const T* ad, i64 adj, i64 adk, const T* g, const T* u, const T* xa,   \
              i64 ldx, int rg, const T* bg, i64 bgj, i64 bgk, int ru, const T* bu, i64 buj, i64 buk, float sg, float su,       \
              const float* cg, const float* cu, float* pg, float* pu, T* dg, T* du, T* h, i64 rows, i64 cols, int act,        \
              int vec) {                                                                                                      \
            mlp_backward<T, M>(dh, xd, ldd, rd, ad, adj, adk, g, u, xa, ldx, rg, bg, bgj, bgk, xa + rg, ldx, ru, bu, buj, buk, \
                               sg, su, cg, cu, pg, pu, dg, du, h, rows, cols, act, vec);                                      \
          }

        LH_LORA_MLP_ENTRIES(float, f32, 2)
        LH_LORA_MLP_ENTRIES(float, f32, 4)
        LH_LORA_MLP_ENTRIES(f16, f16, 2)
        LH_LORA_MLP_ENTRIES(f16, f16, 4)
        LH_LORA_MLP_ENTRIES(bf16, bf16, 2)
        LH_LORA_MLP_ENTRIES(bf16, bf16, 4)
        """;
}
