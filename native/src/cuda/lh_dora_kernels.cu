// Fused DoRA output kernels: y = t + c·(t − b) forward, and its backward in one pass over the gradient (plus a small
// column reduce). Plain CUDA over raw pointers (launchers and the exact formulas in lh_kernels_dora.h); arithmetic in
// fp32 registers with the fp32 correction c, so a correction like 0.0234 is never rounded to the activations' dtype.
#include "lh_kernels_dora.h"
#include "lh_kernels_fused.h"  // LH_FUSED_* dtype codes
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace {

template <typename T> struct DCvt;
template <> struct DCvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <> struct DCvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <> struct DCvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <typename T, int N> struct alignas(sizeof(T) * N) DPack {
  T v[N];
};

constexpr int kTileX = 32;  // column vectors per block (threadIdx.x)
constexpr int kRowsY = 8;   // rows per block step (threadIdx.y)

bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// One thread owns N consecutive columns (vector vc) and walks rows blockIdx.y·8 + threadIdx.y, stepping gridDim.y·8.
template <typename T, int N>
__global__ void dora_forward_kernel(const T* __restrict__ t, const float* __restrict__ c, const T* __restrict__ bias,
                                    T* __restrict__ y, int64_t rows, int64_t nvec) {
  const int64_t vc = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  if (vc >= nvec) return;
  const int64_t cols = nvec * N;
  float cc[N], bb[N];
#pragma unroll
  for (int k = 0; k < N; k++) {
    cc[k] = c[vc * N + k];
    bb[k] = bias != nullptr ? DCvt<T>::to(bias[vc * N + k]) : 0.f;
  }
  const int64_t step = static_cast<int64_t>(gridDim.y) * kRowsY;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * kRowsY + threadIdx.y; r < rows; r += step) {
    const DPack<T, N> p = reinterpret_cast<const DPack<T, N>*>(t + r * cols)[vc];
    DPack<T, N> o;
#pragma unroll
    for (int k = 0; k < N; k++) {
      const float v = DCvt<T>::to(p.v[k]);
      o.v[k] = DCvt<T>::from(fmaf(cc[k], v - bb[k], v));
    }
    reinterpret_cast<DPack<T, N>*>(y + r * cols)[vc] = o;
  }
}

// gt = g·(1 + c) and per-block column sums of g·(y − b) into partial[blockIdx.y, :].
template <typename T, int N>
__global__ void dora_backward_kernel(const T* __restrict__ g, const T* __restrict__ y, const float* __restrict__ c,
                                     const T* __restrict__ bias, T* __restrict__ gt, float* __restrict__ partial,
                                     int64_t rows, int64_t nvec) {
  __shared__ float red[kRowsY][kTileX * N];
  const int64_t vc = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  const bool active = vc < nvec;
  const int64_t cols = nvec * N;
  float acc[N];
#pragma unroll
  for (int k = 0; k < N; k++) acc[k] = 0.f;
  if (active) {
    float c1[N], bb[N];
#pragma unroll
    for (int k = 0; k < N; k++) {
      c1[k] = 1.f + c[vc * N + k];
      bb[k] = bias != nullptr ? DCvt<T>::to(bias[vc * N + k]) : 0.f;
    }
    const int64_t step = static_cast<int64_t>(gridDim.y) * kRowsY;
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kRowsY + threadIdx.y; r < rows; r += step) {
      const DPack<T, N> gp = reinterpret_cast<const DPack<T, N>*>(g + r * cols)[vc];
      const DPack<T, N> yp = reinterpret_cast<const DPack<T, N>*>(y + r * cols)[vc];
      DPack<T, N> o;
#pragma unroll
      for (int k = 0; k < N; k++) {
        const float d = DCvt<T>::to(gp.v[k]);
        o.v[k] = DCvt<T>::from(d * c1[k]);
        acc[k] = fmaf(d, DCvt<T>::to(yp.v[k]) - bb[k], acc[k]);
      }
      reinterpret_cast<DPack<T, N>*>(gt + r * cols)[vc] = o;
    }
  }
#pragma unroll
  for (int k = 0; k < N; k++) red[threadIdx.y][threadIdx.x * N + k] = acc[k];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    float* out = partial + static_cast<int64_t>(blockIdx.y) * cols + vc * N;
#pragma unroll
    for (int k = 0; k < N; k++) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < kRowsY; j++) s += red[j][threadIdx.x * N + k];
      out[k] = s;
    }
  }
}

// gc[j] = Σ_b partial[b, j] / (1 + c[j]): 32 columns × 8 lanes of partials per block, then a sum over the lanes.
__global__ void dora_grad_c_reduce_kernel(const float* __restrict__ partial, int blocks, const float* __restrict__ c,
                                          float* __restrict__ gc, int64_t cols) {
  __shared__ float tile[8][33];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float s = 0.f;
  if (j < cols) {
    for (int b = threadIdx.y; b < blocks; b += 8) s += partial[static_cast<int64_t>(b) * cols + j];
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

template <typename T>
cudaError_t dora_forward(const void* t, const float* c, const void* bias, void* y, int64_t rows, int64_t cols,
                         int row_blocks, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (row_blocks < 1 || row_blocks > 65535) return cudaErrorInvalidValue;
  const dim3 block(kTileX, kRowsY);
  const T* tt = static_cast<const T*>(t);
  const T* tb = static_cast<const T*>(bias);
  T* ty = static_cast<T*>(y);
  if (cols % V == 0 && is_aligned16(t) && is_aligned16(y)) {
    const int64_t nvec = cols / V;
    const dim3 grid(static_cast<unsigned>((nvec + kTileX - 1) / kTileX), static_cast<unsigned>(row_blocks));
    dora_forward_kernel<T, V><<<grid, block, 0, stream>>>(tt, c, tb, ty, rows, nvec);
  } else {
    const dim3 grid(static_cast<unsigned>((cols + kTileX - 1) / kTileX), static_cast<unsigned>(row_blocks));
    dora_forward_kernel<T, 1><<<grid, block, 0, stream>>>(tt, c, tb, ty, rows, cols);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dora_backward(const void* g, const void* y, const float* c, const void* bias, void* gt, float* partial,
                          int64_t rows, int64_t cols, int row_blocks, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (cols == 0) return cudaSuccess;
  if (row_blocks < 1 || row_blocks > 65535) return cudaErrorInvalidValue;
  // rows == 0 still runs: every block writes its (zero) partial sums, so the reduce never reads unwritten memory.
  const dim3 block(kTileX, kRowsY);
  const T* tg = static_cast<const T*>(g);
  const T* tyv = static_cast<const T*>(y);
  const T* tb = static_cast<const T*>(bias);
  T* tgt = static_cast<T*>(gt);
  if (cols % V == 0 && is_aligned16(g) && is_aligned16(y) && is_aligned16(gt)) {
    const int64_t nvec = cols / V;
    const dim3 grid(static_cast<unsigned>((nvec + kTileX - 1) / kTileX), static_cast<unsigned>(row_blocks));
    dora_backward_kernel<T, V><<<grid, block, 0, stream>>>(tg, tyv, c, tb, tgt, partial, rows, nvec);
  } else {
    const dim3 grid(static_cast<unsigned>((cols + kTileX - 1) / kTileX), static_cast<unsigned>(row_blocks));
    dora_backward_kernel<T, 1><<<grid, block, 0, stream>>>(tg, tyv, c, tb, tgt, partial, rows, cols);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t lh_launch_dora_forward(int dtype, const void* t, const float* c, const void* bias, void* y, int64_t rows,
                                   int64_t cols, int row_blocks, cudaStream_t stream) {
  switch (dtype) {
    case LH_FUSED_F32: return dora_forward<float>(t, c, bias, y, rows, cols, row_blocks, stream);
    case LH_FUSED_F16: return dora_forward<__half>(t, c, bias, y, rows, cols, row_blocks, stream);
    case LH_FUSED_BF16: return dora_forward<__nv_bfloat16>(t, c, bias, y, rows, cols, row_blocks, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t lh_launch_dora_backward(int dtype, const void* g, const void* y, const float* c, const void* bias, void* gt,
                                    float* partial, int64_t rows, int64_t cols, int row_blocks, cudaStream_t stream) {
  switch (dtype) {
    case LH_FUSED_F32: return dora_backward<float>(g, y, c, bias, gt, partial, rows, cols, row_blocks, stream);
    case LH_FUSED_F16: return dora_backward<__half>(g, y, c, bias, gt, partial, rows, cols, row_blocks, stream);
    case LH_FUSED_BF16: return dora_backward<__nv_bfloat16>(g, y, c, bias, gt, partial, rows, cols, row_blocks, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t lh_launch_dora_grad_c_reduce(const float* partial, int row_blocks, const float* c, float* gc, int64_t cols,
                                         cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  const dim3 block(32, 8);
  const unsigned grid = static_cast<unsigned>((cols + 31) / 32);
  dora_grad_c_reduce_kernel<<<grid, block, 0, stream>>>(partial, row_blocks, c, gc, cols);
  return cudaGetLastError();
}
