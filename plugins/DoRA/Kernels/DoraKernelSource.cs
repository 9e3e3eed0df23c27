namespace LoRAHub.Plugins.DoRA;

/// <summary>
/// The CUDA C source of the fused DoRA output kernels, compiled at run time by NVRTC (LoRAHub.TorchExtensions.Cuda).
/// Kept in a string so the plugin needs no build step of its own. Over a contiguous (rows × cols) tensor t of dtype T
/// (fp32/fp16/bf16) with the fp32 correction c (cols) and an optional bias b (cols, dtype T):
///   forward   y[i,j]  = t[i,j] + c[j]·(t[i,j] − b[j])                     (fp32 registers, rounded once to T)
///   backward  gt[i,j] = g[i,j]·(1 + c[j])
///             gc[j]   = Σ_i g[i,j]·(t[i,j] − b[j]) = Σ_i g[i,j]·(y[i,j] − b[j]) / (1 + c[j])
/// Backward reads the forward's output y rather than t (y − b = (1 + c)·(t − b)), so t need not be kept for backward.
/// Blocks are 32 × 8 threads: 32 column vectors (16 bytes each where the data allows) by 8 rows; grid.y blocks stride down
/// the rows. Backward writes per-block column sums (grid.y × cols floats, all written) that the reduce kernel sums into
/// gc, scaled by 1/(1 + c[j]) (0 where 1 + c[j] = 0). Entry points lh_dora_<fwd|bwd>_<f32|f16|bf16>_<1|v>, lh_dora_grad_c_reduce.
/// </summary>
internal static class DoraKernelSource
{
    public const string Name = "dora.cu";

    public const string Code = """
        #include "lh_common.cuh"

        #define LH_TILE_X 32  // column vectors per block (threadIdx.x)
        #define LH_ROWS_Y 8   // rows per block step (threadIdx.y)

        // One thread owns N consecutive columns (vector vc) and walks rows blockIdx.y·8 + threadIdx.y, stepping gridDim.y·8.
        template <typename T, int N>
        __device__ __forceinline__ void dora_forward(const T* __restrict__ t, const float* __restrict__ c, const T* __restrict__ bias,
                                                     T* __restrict__ y, i64 rows, i64 nvec) {
          const i64 vc = static_cast<i64>(blockIdx.x) * LH_TILE_X + threadIdx.x;
          if (vc >= nvec) return;
          const i64 cols = nvec * N;
          float cc[N], bb[N];
        #pragma unroll
          for (int k = 0; k < N; k++) {
            cc[k] = c[vc * N + k];
            bb[k] = bias != nullptr ? Cvt<T>::to(bias[vc * N + k]) : 0.f;
          }
          const i64 step = static_cast<i64>(gridDim.y) * LH_ROWS_Y;
          for (i64 r = static_cast<i64>(blockIdx.y) * LH_ROWS_Y + threadIdx.y; r < rows; r += step) {
            const Pack<T, N> p = reinterpret_cast<const Pack<T, N>*>(t + r * cols)[vc];
            Pack<T, N> o;
        #pragma unroll
            for (int k = 0; k < N; k++) {
              const float v = Cvt<T>::to(p.v[k]);
              o.v[k] = Cvt<T>::from(fmaf(cc[k], v - bb[k], v));
            }
            reinterpret_cast<Pack<T, N>*>(y + r * cols)[vc] = o;
          }
        }

        // gt = g·(1 + c) and per-block column sums of g·(y − b) into partial[blockIdx.y, :].
        template <typename T, int N>
        __device__ __forceinline__ void dora_backward(const T* __restrict__ g, const T* __restrict__ y, const float* __restrict__ c,
                                                      const T* __restrict__ bias, T* __restrict__ gt, float* __restrict__ partial,
                                                      i64 rows, i64 nvec) {
          __shared__ float red[LH_ROWS_Y][LH_TILE_X * N];
          const i64 vc = static_cast<i64>(blockIdx.x) * LH_TILE_X + threadIdx.x;
          const bool active = vc < nvec;
          const i64 cols = nvec * N;
          float acc[N];
        #pragma unroll
          for (int k = 0; k < N; k++) acc[k] = 0.f;
          if (active) {
            float c1[N], bb[N];
        #pragma unroll
            for (int k = 0; k < N; k++) {
              c1[k] = 1.f + c[vc * N + k];
              bb[k] = bias != nullptr ? Cvt<T>::to(bias[vc * N + k]) : 0.f;
            }
            const i64 step = static_cast<i64>(gridDim.y) * LH_ROWS_Y;
            for (i64 r = static_cast<i64>(blockIdx.y) * LH_ROWS_Y + threadIdx.y; r < rows; r += step) {
              const Pack<T, N> gp = reinterpret_cast<const Pack<T, N>*>(g + r * cols)[vc];
              const Pack<T, N> yp = reinterpret_cast<const Pack<T, N>*>(y + r * cols)[vc];
              Pack<T, N> o;
        #pragma unroll
              for (int k = 0; k < N; k++) {
                const float d = Cvt<T>::to(gp.v[k]);
                o.v[k] = Cvt<T>::from(d * c1[k]);
                acc[k] = fmaf(d, Cvt<T>::to(yp.v[k]) - bb[k], acc[k]);
              }
              reinterpret_cast<Pack<T, N>*>(gt + r * cols)[vc] = o;
            }
          }
        #pragma unroll
          for (int k = 0; k < N; k++) red[threadIdx.y][threadIdx.x * N + k] = acc[k];
          __syncthreads();
          if (threadIdx.y == 0 && active) {
            float* out = partial + static_cast<i64>(blockIdx.y) * cols + vc * N;
        #pragma unroll
            for (int k = 0; k < N; k++) {
              float s = 0.f;
        #pragma unroll
              for (int j = 0; j < LH_ROWS_Y; j++) s += red[j][threadIdx.x * N + k];
              out[k] = s;
            }
          }
        }

        // gc[j] = Σ_b partial[b, j] / (1 + c[j]): 32 columns × 8 lanes of partials per block (block 32 × 8), then a sum over the lanes.
        extern "C" __global__ void lh_dora_grad_c_reduce(const float* __restrict__ partial, int blocks, const float* __restrict__ c,
                                                         float* __restrict__ gc, i64 cols) {
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
            const float scale = 1.f + c[j];
            gc[j] = scale != 0.f ? total / scale : 0.f;
          }
        }

        #define LH_WIDTH_1(T) 1
        #define LH_WIDTH_v(T) (16 / sizeof(T))

        #define LH_DORA_ENTRIES(T, S, V)                                                                                   \
          extern "C" __global__ void lh_dora_fwd_##S##_##V(const T* t, const float* c, const T* bias, T* y, i64 rows, i64 nvec) { \
            dora_forward<T, LH_WIDTH_##V(T)>(t, c, bias, y, rows, nvec);                                                    \
          }                                                                                                                 \
          extern "C" __global__ void lh_dora_bwd_##S##_##V(const T* g, const T* y, const float* c, const T* bias, T* gt,    \
                                                           float* partial, i64 rows, i64 nvec) {                            \
            dora_backward<T, LH_WIDTH_##V(T)>(g, y, c, bias, gt, partial, rows, nvec);                                      \
          }

        LH_DORA_ENTRIES(float, f32, 1)
        LH_DORA_ENTRIES(float, f32, v)
        LH_DORA_ENTRIES(f16, f16, 1)
        LH_DORA_ENTRIES(f16, f16, v)
        LH_DORA_ENTRIES(bf16, bf16, 1)
        LH_DORA_ENTRIES(bf16, bf16, v)
        """;
}
