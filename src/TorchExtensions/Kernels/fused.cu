// Fused kernels of a Llama block: RMSNorm, SwiGLU and rotary embeddings, forward and backward, over raw pointers.
// Arithmetic in fp32 registers, 128-bit accesses where the caller found the data aligned (the _v kernels). Rounding
// follows transformers' modules: RMSNorm normalises in fp32, casts to the input dtype, then multiplies by the weight;
// SwiGLU rounds silu(g) to the input dtype before the product (as silu(g) * u does).
// Entry points: lh_<op>_<f32|f16|bf16>_<1|v> (v: 16 bytes per access); the C# launchers are in FusedOps/.
#include "lh_common.cuh"

// ---------------------------------------------------------------- RMSNorm

// One block per row: y = w · cast(x · rstd), rstd = 1/sqrt(mean(x²) + eps); rstd[row] kept for backward.
template <typename T, int N>
__device__ __forceinline__ void rms_norm_forward(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                                 float* __restrict__ rstd, i64 cols, float eps) {
  __shared__ float red[32];
  const i64 row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const i64 nvec = cols / N;
  float ss = 0.f;
  for (i64 i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Pack<T, N> p = load_pack<T, N>(xr, i);
#pragma unroll
    for (int k = 0; k < N; k++) {
      const float v = Cvt<T>::to(p.v[k]);
      ss += v * v;
    }
  }
  ss = block_sum(ss, red);
  const float r = rsqrtf(ss / static_cast<float>(cols) + eps);
  if (rstd != nullptr && threadIdx.x == 0) rstd[row] = r;
  for (i64 i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Pack<T, N> p = load_pack<T, N>(xr, i);
    Pack<T, N> o;
    if (w != nullptr) {
      const Pack<T, N> q = load_pack<T, N>(w, i);
#pragma unroll
      for (int k = 0; k < N; k++) o.v[k] = Cvt<T>::from(round_to<T>(Cvt<T>::to(p.v[k]) * r) * Cvt<T>::to(q.v[k]));
    } else {
#pragma unroll
      for (int k = 0; k < N; k++) o.v[k] = Cvt<T>::from(Cvt<T>::to(p.v[k]) * r);
    }
    store_pack<T, N>(yr, i, o);
  }
}

// dx = rstd · (g − x̂ · mean(g · x̂)), g = dy · w, x̂ = x · rstd. Blocks stride over rows; each thread owns the same
// columns in every row, so its share of the dw accumulator in shared memory (k-major: acc[k · nvec + i]) needs no
// atomics. With dw_partial, each block writes its rows' Σ dy · cast(x̂) (cols floats) for the reduce kernel.
template <typename T, int N>
__device__ __forceinline__ void rms_norm_backward(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                                  const float* __restrict__ rstd, T* __restrict__ dx,
                                                  float* __restrict__ dw_partial, i64 rows, i64 cols) {
  extern __shared__ float smem[];
  float* red = smem;
  float* acc = smem + 32;
  const i64 nvec = cols / N;
  const float inv_cols = 1.f / static_cast<float>(cols);
  if (dw_partial != nullptr) {
    for (i64 i = threadIdx.x; i < nvec; i += blockDim.x) {
#pragma unroll
      for (int k = 0; k < N; k++) acc[k * nvec + i] = 0.f;
    }
  }
  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * cols;
    const T* dyr = dy + row * cols;
    T* dxr = dx + row * cols;
    const float r = rstd[row];
    float dot = 0.f;
    for (i64 i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Pack<T, N> xp = load_pack<T, N>(xr, i);
      const Pack<T, N> gp = load_pack<T, N>(dyr, i);
      if (w != nullptr) {
        const Pack<T, N> wp = load_pack<T, N>(w, i);
#pragma unroll
        for (int k = 0; k < N; k++) dot += Cvt<T>::to(gp.v[k]) * Cvt<T>::to(wp.v[k]) * (Cvt<T>::to(xp.v[k]) * r);
      } else {
#pragma unroll
        for (int k = 0; k < N; k++) dot += Cvt<T>::to(gp.v[k]) * (Cvt<T>::to(xp.v[k]) * r);
      }
    }
    const float mean_dot = block_sum(dot, red) * inv_cols;
    for (i64 i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Pack<T, N> xp = load_pack<T, N>(xr, i);
      const Pack<T, N> gp = load_pack<T, N>(dyr, i);
      Pack<T, N> wp;
      if (w != nullptr) wp = load_pack<T, N>(w, i);
      Pack<T, N> o;
#pragma unroll
      for (int k = 0; k < N; k++) {
        const float xh = Cvt<T>::to(xp.v[k]) * r;
        const float d = Cvt<T>::to(gp.v[k]);
        const float g = w != nullptr ? d * Cvt<T>::to(wp.v[k]) : d;
        o.v[k] = Cvt<T>::from(r * (g - xh * mean_dot));
        if (dw_partial != nullptr) acc[k * nvec + i] += d * round_to<T>(xh);
      }
      store_pack<T, N>(dxr, i, o);
    }
  }
  if (dw_partial != nullptr) {
    float* out = dw_partial + static_cast<i64>(blockIdx.x) * cols;
    for (i64 i = threadIdx.x; i < nvec; i += blockDim.x) {
#pragma unroll
      for (int k = 0; k < N; k++) out[i * N + k] = acc[k * nvec + i];
    }
  }
}

// dw[c] = Σ_b partial[b, c]: blocks of 32 columns × 8 lanes of partials, then a sum over the lanes. Block (32, 8).
template <typename T>
__device__ __forceinline__ void rms_norm_dw_reduce(const float* __restrict__ partial, int blocks, T* __restrict__ dw, i64 cols) {
  const float total = column_sum(partial, blocks, cols);
  const i64 c = static_cast<i64>(blockIdx.x) * 32 + threadIdx.x;
  if (threadIdx.y == 0 && c < cols) dw[c] = Cvt<T>::from(total);
}

// ---------------------------------------------------------------- SwiGLU

template <typename T, int N>
__device__ __forceinline__ void swiglu_forward(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y, i64 nvec) {
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const Pack<T, N> gp = load_pack<T, N>(g, i);
    const Pack<T, N> up = load_pack<T, N>(u, i);
    Pack<T, N> o;
#pragma unroll
    for (int k = 0; k < N; k++) {
      const float gv = Cvt<T>::to(gp.v[k]);
      const float act = round_to<T>(gv * lh_sigmoid(gv));
      o.v[k] = Cvt<T>::from(act * Cvt<T>::to(up.v[k]));
    }
    store_pack<T, N>(y, i, o);
  }
}

template <typename T, int N>
__device__ __forceinline__ void swiglu_backward(const T* __restrict__ dy, const T* __restrict__ g, const T* __restrict__ u,
                                                T* __restrict__ dg, T* __restrict__ du, i64 nvec) {
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const Pack<T, N> dp = load_pack<T, N>(dy, i);
    const Pack<T, N> gp = load_pack<T, N>(g, i);
    const Pack<T, N> up = load_pack<T, N>(u, i);
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
    store_pack<T, N>(dg, i, og);
    store_pack<T, N>(du, i, ou);
  }
}

// ---------------------------------------------------------------- rotary embedding

// x (B, H, T, D) with unit stride along D and element strides xb, xh, xt (output: yb, yh, yt); fp32 tables cos, sin
// (T, D) with row stride cs. One thread per N-element slice of the first half of a row and its partner slice in the
// second half (hv slices per half row, total = B·H·T·hv).
// Forward: y1 = x1·c1 − x2·s1, y2 = x2·c2 + x1·s2. Backward (the transpose): dx1 = d1·c1 + d2·s2, dx2 = d2·c2 − d1·s1.
template <typename T, int N>
__device__ __forceinline__ void rope(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ cos,
                                     const float* __restrict__ sin, i64 H, i64 Tn, i64 half, i64 hv, i64 xb, i64 xh, i64 xt,
                                     i64 yb, i64 yh, i64 yt, i64 cs, i64 total, int backward) {
  for (i64 idx = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 j = (idx % hv) * N;
    const i64 row = idx / hv;
    const i64 t = row % Tn;
    const i64 bh = row / Tn;
    const i64 h = bh % H;
    const i64 b = bh / H;
    const T* xr = x + b * xb + h * xh + t * xt;
    T* yr = y + b * yb + h * yh + t * yt;
    const float* cr = cos + t * cs;
    const float* sr = sin + t * cs;
    const Pack<T, N> a = *reinterpret_cast<const Pack<T, N>*>(xr + j);
    const Pack<T, N> c = *reinterpret_cast<const Pack<T, N>*>(xr + half + j);
    Pack<T, N> o1, o2;
#pragma unroll
    for (int k = 0; k < N; k++) {
      const float x1 = Cvt<T>::to(a.v[k]), x2 = Cvt<T>::to(c.v[k]);
      const float c1 = __ldg(cr + j + k), c2 = __ldg(cr + half + j + k);
      const float s1 = __ldg(sr + j + k), s2 = __ldg(sr + half + j + k);
      if (backward) {
        o1.v[k] = Cvt<T>::from(x1 * c1 + x2 * s2);
        o2.v[k] = Cvt<T>::from(x2 * c2 - x1 * s1);
      } else {
        o1.v[k] = Cvt<T>::from(x1 * c1 - x2 * s1);
        o2.v[k] = Cvt<T>::from(x2 * c2 + x1 * s2);
      }
    }
    *reinterpret_cast<Pack<T, N>*>(yr + j) = o1;
    *reinterpret_cast<Pack<T, N>*>(yr + half + j) = o2;
  }
}

// ---------------------------------------------------------------- entry points

#define LH_FUSED_ENTRIES(T, S, V)                                                                                        \
  extern "C" __global__ void lh_rms_norm_fwd_##S##_##V(const T* x, const T* w, T* y, float* rstd, i64 cols, float eps) { lh_grid_dependency_sync();  \
    rms_norm_forward<T, LH_WIDTH_##V(T)>(x, w, y, rstd, cols, eps);                                                       \
  }                                                                                                                       \
  extern "C" __global__ void lh_rms_norm_bwd_##S##_##V(const T* dy, const T* x, const T* w, const float* rstd, T* dx,     \
                                                       float* dw_partial, i64 rows, i64 cols) { lh_grid_dependency_sync();                           \
    rms_norm_backward<T, LH_WIDTH_##V(T)>(dy, x, w, rstd, dx, dw_partial, rows, cols);                                    \
  }                                                                                                                       \
  extern "C" __global__ void lh_swiglu_fwd_##S##_##V(const T* g, const T* u, T* y, i64 nvec) { lh_grid_dependency_sync();                           \
    swiglu_forward<T, LH_WIDTH_##V(T)>(g, u, y, nvec);                                                                    \
  }                                                                                                                       \
  extern "C" __global__ void lh_swiglu_bwd_##S##_##V(const T* dy, const T* g, const T* u, T* dg, T* du, i64 nvec) { lh_grid_dependency_sync();      \
    swiglu_backward<T, LH_WIDTH_##V(T)>(dy, g, u, dg, du, nvec);                                                          \
  }                                                                                                                       \
  extern "C" __global__ void lh_rope_##S##_##V(const T* x, T* y, const float* cos, const float* sin, i64 H, i64 Tn,       \
                                               i64 half, i64 hv, i64 xb, i64 xh, i64 xt, i64 yb, i64 yh, i64 yt, i64 cs,   \
                                               i64 total, int backward) { lh_grid_dependency_sync();                                                 \
    rope<T, LH_WIDTH_##V(T)>(x, y, cos, sin, H, Tn, half, hv, xb, xh, xt, yb, yh, yt, cs, total, backward);               \
  }

#define LH_WIDTH_1(T) 1
#define LH_WIDTH_v(T) (16 / sizeof(T))

LH_FUSED_ENTRIES(float, f32, 1)
LH_FUSED_ENTRIES(float, f32, v)
LH_FUSED_ENTRIES(f16, f16, 1)
LH_FUSED_ENTRIES(f16, f16, v)
LH_FUSED_ENTRIES(bf16, bf16, 1)
LH_FUSED_ENTRIES(bf16, bf16, v)

extern "C" __global__ void lh_rms_norm_dw_reduce_f32(const float* partial, int blocks, float* dw, i64 cols) { lh_grid_dependency_sync();
  rms_norm_dw_reduce<float>(partial, blocks, dw, cols);
}
extern "C" __global__ void lh_rms_norm_dw_reduce_f16(const float* partial, int blocks, f16* dw, i64 cols) { lh_grid_dependency_sync();
  rms_norm_dw_reduce<f16>(partial, blocks, dw, cols);
}
extern "C" __global__ void lh_rms_norm_dw_reduce_bf16(const float* partial, int blocks, bf16* dw, i64 cols) { lh_grid_dependency_sync();
  rms_norm_dw_reduce<bf16>(partial, blocks, dw, cols);
}
