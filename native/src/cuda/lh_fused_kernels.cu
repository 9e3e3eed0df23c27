// Fused CUDA kernels for a Llama block: RMSNorm, SwiGLU and rotary embeddings, forward and backward.
// Plain CUDA over raw pointers (launchers in lh_kernels_fused.h); arithmetic in fp32 registers, 128-bit loads where the
// data allows. Rounding follows transformers' modules: RMSNorm normalises in fp32, casts to the input dtype, then
// multiplies by the weight; SwiGLU rounds silu(g) to the input dtype before the product (as silu(g) * u does).
#include "lh_kernels_fused.h"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace {

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// Rounds a float to T and back (the value the composite path would hold in a T tensor).
template <typename T> __device__ __forceinline__ float round_to(float v) { return Cvt<T>::to(Cvt<T>::from(v)); }

// N consecutive elements moved as one access (16 bytes for N = 16 / sizeof(T)).
template <typename T, int N> struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N> __device__ __forceinline__ Pack<T, N> load(const T* p, int64_t i) {
  return reinterpret_cast<const Pack<T, N>*>(p)[i];
}
template <typename T, int N> __device__ __forceinline__ void store(T* p, int64_t i, const Pack<T, N>& v) {
  reinterpret_cast<Pack<T, N>*>(p)[i] = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result. `red` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < warps ? red[lane] : 0.f;
    s = warp_sum(s);
    if (lane == 0) red[0] = s;
  }
  __syncthreads();
  const float total = red[0];
  __syncthreads();  // red may be reused right after
  return total;
}

__device__ __forceinline__ float lh_sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int threads_for(int64_t work) {
  int64_t t = (work + 31) / 32 * 32;
  if (t < 64) t = 64;
  if (t > 512) t = 512;
  return static_cast<int>(t);
}

// ---------------------------------------------------------------- RMSNorm

template <typename T, int N>
__global__ void rms_norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                        float* __restrict__ rstd, int64_t cols, float eps) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const int64_t nvec = cols / N;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Pack<T, N> p = load<T, N>(xr, i);
#pragma unroll
    for (int k = 0; k < N; k++) {
      const float v = Cvt<T>::to(p.v[k]);
      ss += v * v;
    }
  }
  ss = block_sum(ss, red);
  const float r = rsqrtf(ss / static_cast<float>(cols) + eps);
  if (rstd != nullptr && threadIdx.x == 0) rstd[row] = r;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Pack<T, N> p = load<T, N>(xr, i);
    Pack<T, N> o;
    if (w != nullptr) {
      const Pack<T, N> q = load<T, N>(w, i);
#pragma unroll
      for (int k = 0; k < N; k++) o.v[k] = Cvt<T>::from(round_to<T>(Cvt<T>::to(p.v[k]) * r) * Cvt<T>::to(q.v[k]));
    } else {
#pragma unroll
      for (int k = 0; k < N; k++) o.v[k] = Cvt<T>::from(Cvt<T>::to(p.v[k]) * r);
    }
    store<T, N>(yr, i, o);
  }
}

// Blocks stride over rows. Each thread owns the same columns in every row, so its share of the dw accumulator in
// shared memory (laid out k-major: acc[k * nvec + i], conflict-free) needs no atomics.
template <typename T, int N>
__global__ void rms_norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                         const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dw_partial,
                                         int64_t rows, int64_t cols) {
  extern __shared__ float smem[];
  float* red = smem;
  float* acc = smem + 32;
  const int64_t nvec = cols / N;
  const float inv_cols = 1.f / static_cast<float>(cols);
  if (dw_partial != nullptr) {
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
#pragma unroll
      for (int k = 0; k < N; k++) acc[k * nvec + i] = 0.f;
    }
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * cols;
    const T* dyr = dy + row * cols;
    T* dxr = dx + row * cols;
    const float r = rstd[row];
    float dot = 0.f;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Pack<T, N> xp = load<T, N>(xr, i);
      const Pack<T, N> gp = load<T, N>(dyr, i);
      if (w != nullptr) {
        const Pack<T, N> wp = load<T, N>(w, i);
#pragma unroll
        for (int k = 0; k < N; k++) dot += Cvt<T>::to(gp.v[k]) * Cvt<T>::to(wp.v[k]) * (Cvt<T>::to(xp.v[k]) * r);
      } else {
#pragma unroll
        for (int k = 0; k < N; k++) dot += Cvt<T>::to(gp.v[k]) * (Cvt<T>::to(xp.v[k]) * r);
      }
    }
    const float mean_dot = block_sum(dot, red) * inv_cols;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Pack<T, N> xp = load<T, N>(xr, i);
      const Pack<T, N> gp = load<T, N>(dyr, i);
      Pack<T, N> wp;
      if (w != nullptr) wp = load<T, N>(w, i);
      Pack<T, N> o;
#pragma unroll
      for (int k = 0; k < N; k++) {
        const float xh = Cvt<T>::to(xp.v[k]) * r;
        const float d = Cvt<T>::to(gp.v[k]);
        const float g = w != nullptr ? d * Cvt<T>::to(wp.v[k]) : d;
        o.v[k] = Cvt<T>::from(r * (g - xh * mean_dot));
        if (dw_partial != nullptr) acc[k * nvec + i] += d * round_to<T>(xh);
      }
      store<T, N>(dxr, i, o);
    }
  }
  if (dw_partial != nullptr) {
    float* out = dw_partial + static_cast<int64_t>(blockIdx.x) * cols;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
#pragma unroll
      for (int k = 0; k < N; k++) out[i * N + k] = acc[k * nvec + i];
    }
  }
}

// dw[c] = Σ_b partial[b, c]: 32 columns × 8 lanes of partials per block, then a reduction over the lanes.
template <typename T>
__global__ void rms_norm_dw_reduce_kernel(const float* __restrict__ partial, int blocks, T* __restrict__ dw, int64_t cols) {
  __shared__ float tile[8][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float s = 0.f;
  if (c < cols) {
    for (int b = threadIdx.y; b < blocks; b += 8) s += partial[static_cast<int64_t>(b) * cols + c];
  }
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.f;
#pragma unroll
    for (int j = 0; j < 8; j++) total += tile[j][threadIdx.x];
    dw[c] = Cvt<T>::from(total);
  }
}

template <typename T>
cudaError_t rms_norm_forward(const void* x, const void* w, void* y, float* rstd, int64_t rows, int64_t cols, float eps,
                             cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = cols % V == 0 && aligned16(x) && aligned16(y) && (w == nullptr || aligned16(w));
  if (rows == 0) return cudaSuccess;
  if (vec) {
    rms_norm_forward_kernel<T, V><<<static_cast<unsigned>(rows), threads_for(cols / V), 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), rstd, cols, eps);
  } else {
    rms_norm_forward_kernel<T, 1><<<static_cast<unsigned>(rows), threads_for(cols), 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), rstd, cols, eps);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t rms_norm_backward(const void* dy, const void* x, const void* w, const float* rstd, void* dx, float* dw_partial,
                              int blocks, int64_t rows, int64_t cols, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (cols > LH_RMS_NORM_MAX_COLS || blocks <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const bool vec = cols % V == 0 && aligned16(dy) && aligned16(x) && aligned16(dx) && (w == nullptr || aligned16(w));
  const size_t shared = (32 + (dw_partial != nullptr ? cols : 0)) * sizeof(float);
  const T* tdy = static_cast<const T*>(dy);
  const T* tx = static_cast<const T*>(x);
  const T* tw = static_cast<const T*>(w);
  T* tdx = static_cast<T*>(dx);
  if (vec) {
    rms_norm_backward_kernel<T, V><<<blocks, threads_for(cols / V), shared, stream>>>(tdy, tx, tw, rstd, tdx, dw_partial, rows, cols);
  } else {
    rms_norm_backward_kernel<T, 1><<<blocks, threads_for(cols), shared, stream>>>(tdy, tx, tw, rstd, tdx, dw_partial, rows, cols);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t rms_norm_dw_reduce(const float* partial, int blocks, void* dw, int64_t cols, cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  const dim3 block(32, 8);
  const unsigned grid = static_cast<unsigned>((cols + 31) / 32);
  rms_norm_dw_reduce_kernel<T><<<grid, block, 0, stream>>>(partial, blocks, static_cast<T*>(dw), cols);
  return cudaGetLastError();
}

// ---------------------------------------------------------------- SwiGLU

template <typename T, int N>
__global__ void swiglu_forward_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y, int64_t nvec) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pack<T, N> gp = load<T, N>(g, i);
    const Pack<T, N> up = load<T, N>(u, i);
    Pack<T, N> o;
#pragma unroll
    for (int k = 0; k < N; k++) {
      const float gv = Cvt<T>::to(gp.v[k]);
      const float act = round_to<T>(gv * lh_sigmoid(gv));
      o.v[k] = Cvt<T>::from(act * Cvt<T>::to(up.v[k]));
    }
    store<T, N>(y, i, o);
  }
}

template <typename T, int N>
__global__ void swiglu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ g, const T* __restrict__ u,
                                       T* __restrict__ dg, T* __restrict__ du, int64_t nvec) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pack<T, N> dp = load<T, N>(dy, i);
    const Pack<T, N> gp = load<T, N>(g, i);
    const Pack<T, N> up = load<T, N>(u, i);
    Pack<T, N> og, ou;
#pragma unroll
    for (int k = 0; k < N; k++) {
      const float d = Cvt<T>::to(dp.v[k]);
      const float gv = Cvt<T>::to(gp.v[k]);
      const float s = lh_sigmoid(gv);
      const float act = round_to<T>(gv * s);
      ou.v[k] = Cvt<T>::from(d * act);
      og.v[k] = Cvt<T>::from(d * Cvt<T>::to(up.v[k]) * s * (1.f + gv * (1.f - s)));
    }
    store<T, N>(dg, i, og);
    store<T, N>(du, i, ou);
  }
}

unsigned elementwise_grid(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  const int64_t cap = 132 * 32;  // enough to fill any current GPU; the loops stride over the rest
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

template <typename T>
cudaError_t swiglu_forward(const void* g, const void* u, void* y, int64_t n, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  if (n % V == 0 && aligned16(g) && aligned16(u) && aligned16(y)) {
    swiglu_forward_kernel<T, V><<<elementwise_grid(n / V, threads), threads, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(y), n / V);
  } else {
    swiglu_forward_kernel<T, 1><<<elementwise_grid(n, threads), threads, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(y), n);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t swiglu_backward(const void* dy, const void* g, const void* u, void* dg, void* du, int64_t n, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const T* tdy = static_cast<const T*>(dy);
  const T* tg = static_cast<const T*>(g);
  const T* tu = static_cast<const T*>(u);
  if (n % V == 0 && aligned16(dy) && aligned16(g) && aligned16(u) && aligned16(dg) && aligned16(du)) {
    swiglu_backward_kernel<T, V><<<elementwise_grid(n / V, threads), threads, 0, stream>>>(
        tdy, tg, tu, static_cast<T*>(dg), static_cast<T*>(du), n / V);
  } else {
    swiglu_backward_kernel<T, 1><<<elementwise_grid(n, threads), threads, 0, stream>>>(
        tdy, tg, tu, static_cast<T*>(dg), static_cast<T*>(du), n);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------- rotary embedding

struct RopeShape {
  int64_t H, T, half, hv;  // heads, positions, D/2, vectors per half row
  int64_t xb, xh, xt;      // input strides (elements)
  int64_t yb, yh, yt;      // output strides
  int64_t cs;              // cos/sin row stride
};

// One thread per N-element slice of the first half of a row and its partner slice in the second half.
// Forward:  y1 = x1·c1 − x2·s1,  y2 = x2·c2 + x1·s2.  Backward (transpose): dx1 = d1·c1 + d2·s2,  dx2 = d2·c2 − d1·s1.
template <typename T, int N>
__global__ void rope_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ cos,
                            const float* __restrict__ sin, RopeShape s, int64_t total, int backward) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = (idx % s.hv) * N;
    const int64_t row = idx / s.hv;
    const int64_t t = row % s.T;
    const int64_t bh = row / s.T;
    const int64_t h = bh % s.H;
    const int64_t b = bh / s.H;
    const T* xr = x + b * s.xb + h * s.xh + t * s.xt;
    T* yr = y + b * s.yb + h * s.yh + t * s.yt;
    const float* cr = cos + t * s.cs;
    const float* sr = sin + t * s.cs;
    const Pack<T, N> a = *reinterpret_cast<const Pack<T, N>*>(xr + j);
    const Pack<T, N> c = *reinterpret_cast<const Pack<T, N>*>(xr + s.half + j);
    Pack<T, N> o1, o2;
#pragma unroll
    for (int k = 0; k < N; k++) {
      const float x1 = Cvt<T>::to(a.v[k]), x2 = Cvt<T>::to(c.v[k]);
      const float c1 = __ldg(cr + j + k), c2 = __ldg(cr + s.half + j + k);
      const float s1 = __ldg(sr + j + k), s2 = __ldg(sr + s.half + j + k);
      if (backward) {
        o1.v[k] = Cvt<T>::from(x1 * c1 + x2 * s2);
        o2.v[k] = Cvt<T>::from(x2 * c2 - x1 * s1);
      } else {
        o1.v[k] = Cvt<T>::from(x1 * c1 - x2 * s1);
        o2.v[k] = Cvt<T>::from(x2 * c2 + x1 * s2);
      }
    }
    *reinterpret_cast<Pack<T, N>*>(yr + j) = o1;
    *reinterpret_cast<Pack<T, N>*>(yr + s.half + j) = o2;
  }
}

template <typename T>
cudaError_t rope(const void* x, void* y, const float* cos, const float* sin, int64_t nb, int64_t nh, int64_t nt, int64_t nd,
                 const int64_t* xs, const int64_t* ys, int64_t cs, int backward, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (nd % 2 != 0) return cudaErrorInvalidValue;
  RopeShape s{nh, nt, nd / 2, 0, xs[0], xs[1], xs[2], ys[0], ys[1], ys[2], cs};
  const int64_t rows = nb * nh * nt;
  if (rows == 0 || nd == 0) return cudaSuccess;
  bool vec = s.half % V == 0 && aligned16(x) && aligned16(y);
  for (int i = 0; i < 3; i++) vec = vec && xs[i] % V == 0 && ys[i] % V == 0;
  const int threads = 256;
  if (vec) {
    s.hv = s.half / V;
    const int64_t total = rows * s.hv;
    rope_kernel<T, V><<<elementwise_grid(total, threads), threads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), cos, sin, s, total, backward);
  } else {
    s.hv = s.half;
    const int64_t total = rows * s.hv;
    rope_kernel<T, 1><<<elementwise_grid(total, threads), threads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), cos, sin, s, total, backward);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t lh_launch_rms_norm_forward(int dtype, const void* x, const void* w, void* y, float* rstd, int64_t rows,
                                       int64_t cols, float eps, cudaStream_t stream) {
  switch (dtype) {
    case LH_FUSED_F32: return rms_norm_forward<float>(x, w, y, rstd, rows, cols, eps, stream);
    case LH_FUSED_F16: return rms_norm_forward<__half>(x, w, y, rstd, rows, cols, eps, stream);
    case LH_FUSED_BF16: return rms_norm_forward<__nv_bfloat16>(x, w, y, rstd, rows, cols, eps, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t lh_launch_rms_norm_backward(int dtype, const void* dy, const void* x, const void* w, const float* rstd, void* dx,
                                        float* dw_partial, int blocks, int64_t rows, int64_t cols, cudaStream_t stream) {
  switch (dtype) {
    case LH_FUSED_F32: return rms_norm_backward<float>(dy, x, w, rstd, dx, dw_partial, blocks, rows, cols, stream);
    case LH_FUSED_F16: return rms_norm_backward<__half>(dy, x, w, rstd, dx, dw_partial, blocks, rows, cols, stream);
    case LH_FUSED_BF16: return rms_norm_backward<__nv_bfloat16>(dy, x, w, rstd, dx, dw_partial, blocks, rows, cols, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t lh_launch_rms_norm_dw_reduce(int dtype, const float* dw_partial, int blocks, void* dw, int64_t cols,
                                         cudaStream_t stream) {
  switch (dtype) {
    case LH_FUSED_F32: return rms_norm_dw_reduce<float>(dw_partial, blocks, dw, cols, stream);
    case LH_FUSED_F16: return rms_norm_dw_reduce<__half>(dw_partial, blocks, dw, cols, stream);
    case LH_FUSED_BF16: return rms_norm_dw_reduce<__nv_bfloat16>(dw_partial, blocks, dw, cols, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t lh_launch_swiglu_forward(int dtype, const void* g, const void* u, void* y, int64_t n, cudaStream_t stream) {
  switch (dtype) {
    case LH_FUSED_F32: return swiglu_forward<float>(g, u, y, n, stream);
    case LH_FUSED_F16: return swiglu_forward<__half>(g, u, y, n, stream);
    case LH_FUSED_BF16: return swiglu_forward<__nv_bfloat16>(g, u, y, n, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t lh_launch_swiglu_backward(int dtype, const void* dy, const void* g, const void* u, void* dg, void* du, int64_t n,
                                      cudaStream_t stream) {
  switch (dtype) {
    case LH_FUSED_F32: return swiglu_backward<float>(dy, g, u, dg, du, n, stream);
    case LH_FUSED_F16: return swiglu_backward<__half>(dy, g, u, dg, du, n, stream);
    case LH_FUSED_BF16: return swiglu_backward<__nv_bfloat16>(dy, g, u, dg, du, n, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t lh_launch_rope(int dtype, const void* x, void* y, const float* cos, const float* sin, int64_t B, int64_t H,
                           int64_t T, int64_t D, const int64_t* xs, const int64_t* ys, int64_t cs, int backward,
                           cudaStream_t stream) {
  switch (dtype) {
    case LH_FUSED_F32: return rope<float>(x, y, cos, sin, B, H, T, D, xs, ys, cs, backward, stream);
    case LH_FUSED_F16: return rope<__half>(x, y, cos, sin, B, H, T, D, xs, ys, cs, backward, stream);
    case LH_FUSED_BF16: return rope<__nv_bfloat16>(x, y, cos, sin, B, H, T, D, xs, ys, cs, backward, stream);
    default: return cudaErrorInvalidValue;
  }
}
