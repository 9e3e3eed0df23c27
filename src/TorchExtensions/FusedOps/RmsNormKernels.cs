using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// RMSNorm kernels that keep each row in registers: a row is handled by one warp (up to four for wide rows), each lane
/// loading up to 8 16-byte packs of it at once, sums by warp shuffles, the row read from memory once per pass; rows up
/// to 8,192 bf16/fp16 (4,096 fp32) values. With a residual they also form h = x + a (rounded to the dtype, as the
/// tensor add) and write h beside y, and in backward add h's gradient to the normalisation's (one rounding each, as
/// autograd's accumulation of the two). Plus lh_rms_block_fwd_res: the residual forward in fused.cu's block-per-row
/// layout. On an H200 (8192 × 2048 bf16) the row backward beats fused.cu's (31 vs 35 us; 45 with the residual's
/// gradient vs 35 + a 21 us add) but the row forward does not (33 vs 29 us), so by default the forwards are
/// block-per-row (<see cref="ForwardRows"/>). Same rounding as Kernels/fused.cu (normalise in fp32, cast, multiply by the
/// weight); only the order of the backward's fp32 sums differs. Rows must be whole 16-byte packs, pointers aligned;
/// elsewhere fused.cu's kernels run. Compiled apart: if NVRTC rejects this program, only it turns off.
/// LORAHUB_RMSNORM_ROWS_KERNEL=0 turns it off too (for comparison).
/// </summary>
internal static class RmsNormKernels
{
    private const string Source = """
#include "lh_common.cuh"

// Layout: blockDim = (32·W, R): R rows per block, W warps per row. Thread t of a row holds packs t + j·32W, j < P, of
// that row (a warp's accesses are contiguous 512-byte runs). Launchers guarantee nvec <= 32·W·P, W <= 4 and R <= 8
// (R·W <= 8).

#ifndef LH_ROWS_ASM
#define LH_ROWS_ASM 1
#endif
// Rows are read once: by default they skip L1 (.cg), which keeps the weight (read by every row) there.
#ifndef LH_ROWS_CG
#define LH_ROWS_CG 1
#endif
#if LH_ROWS_CG
#define LH_ROWS_LD "ld.global.cg.v4.u32"
#else
#define LH_ROWS_LD "ld.global.v4.u32"
#endif

// Pack i of a row. LH_ROWS_ASM: a volatile load, issued once where written, so the compiler keeps the row in
// registers instead of reading it from memory again in the second pass (which it may do with plain loads).
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_row(const T* p, i64 i) {
#if LH_ROWS_ASM
  union {
    u32 u[4];
    Pack<T, N> pack;
  } r;
  asm volatile(LH_ROWS_LD " {%0, %1, %2, %3}, [%4];"
               : "=r"(r.u[0]), "=r"(r.u[1]), "=r"(r.u[2]), "=r"(r.u[3])
               : "l"(p + i * N));
  return r.pack;
#else
  return load_pack<T, N>(p, i);
#endif
}

// Element k of a pack as fp32. LH_ROWS_ASM, bf16: through the pack's 32-bit words with a volatile shift or mask, so
// the compiler holds the row packed (half the registers) and converts at each use rather than holding fp32 copies.
template <typename T, int N>
__device__ __forceinline__ float elem(const Pack<T, N>& p, int k) { return Cvt<T>::to(p.v[k]); }
#if LH_ROWS_ASM
template <>
__device__ __forceinline__ float elem<bf16, 8>(const Pack<bf16, 8>& p, int k) {
  union {
    Pack<bf16, 8> pack;
    u32 u[4];
  } c;
  c.pack = p;
  const u32 word = c.u[k >> 1];
  u32 bits;
  if (k & 1) asm volatile("and.b32 %0, %1, 0xffff0000;" : "=r"(bits) : "r"(word));
  else asm volatile("shl.b32 %0, %1, 16;" : "=r"(bits) : "r"(word));
  return __uint_as_float(bits);
}
#endif

// Sum over the 32·W threads of the row of threadIdx.y; the same value in all of them. Every thread of the block calls
// it (W > 1 synchronises the block). red: 8 × 32 floats of shared memory.
__device__ __forceinline__ float row_sum(float v, float* red) {
  v = warp_sum(v);
  const int warps = blockDim.x >> 5;
  if (warps == 1) return v;
  float* r = red + threadIdx.y * 32;
  if ((threadIdx.x & 31) == 0) r[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < warps; i++) s += r[i];
  __syncthreads();
  return s;
}

// The residual sum of a row's packs, v ← cast(v + q), also written to hout (both forward row kernels).
template <typename T, int N, int P>
__device__ __forceinline__ void rms_rows_add(Pack<T, N> (&v)[P], const Pack<T, N> (&q)[P], T* __restrict__ hout, i64 off, i64 nvec,
                                             bool live) {
  const int stride = blockDim.x;
#pragma unroll
  for (int j = 0; j < P; j++) {
    const i64 i = threadIdx.x + static_cast<i64>(j) * stride;
    if (live && i < nvec) {
#pragma unroll
      for (int k = 0; k < N; k++) v[j].v[k] = Cvt<T>::from(elem<T, N>(v[j], k) + elem<T, N>(q[j], k));
      store_pack<T, N>(hout + off, i, v[j]);
    }
  }
}

// One row held in packs: rstd = 1/sqrt(mean(h²) + eps) (every thread of the block calls it: row_sum may synchronise),
// written to rstd[row] when asked, and y = w · cast(h · rstd) (both forward row kernels).
template <typename T, int N, int P>
__device__ __forceinline__ void rms_rows_normalize(const Pack<T, N> (&v)[P], const T* __restrict__ w, T* __restrict__ y,
                                                   float* __restrict__ rstd, i64 row, i64 off, i64 nvec, i64 cols, float eps,
                                                   bool live, float* red) {
  const int stride = blockDim.x;
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < P; j++) {
    const i64 i = threadIdx.x + static_cast<i64>(j) * stride;
    if (live && i < nvec) {
#pragma unroll
      for (int k = 0; k < N; k++) {
        const float f = elem<T, N>(v[j], k);
        ss += f * f;
      }
    }
  }
  ss = row_sum(ss, red);
  const float r = rsqrtf(ss / static_cast<float>(cols) + eps);
  if (!live) return;
  if (rstd != nullptr && threadIdx.x == 0) rstd[row] = r;
#pragma unroll
  for (int j = 0; j < P; j++) {
    const i64 i = threadIdx.x + static_cast<i64>(j) * stride;
    if (i < nvec) {
      const Pack<T, N> wp = load_pack<T, N>(w, i);
      Pack<T, N> o;
#pragma unroll
      for (int k = 0; k < N; k++) o.v[k] = Cvt<T>::from(round_to<T>(elem<T, N>(v[j], k) * r) * elem<T, N>(wp, k));
      store_pack<T, N>(y + off, i, o);
    }
  }
}

// y = w · cast(h · rstd), rstd = 1/sqrt(mean(h²) + eps), h = x, or with a: h = cast(x + a), written to hout.
template <typename T, int N, int P>
__device__ __forceinline__ void rms_rows_forward(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ w,
                                                 T* __restrict__ y, T* __restrict__ hout, float* __restrict__ rstd,
                                                 i64 rows, i64 nvec, i64 cols, float eps) {
  __shared__ float red[8 * 32];
  const int stride = blockDim.x;
  // Rows stride by gridDim.x · R (one pass when the grid covers them); the same trip count in the whole block.
  for (i64 row0 = static_cast<i64>(blockIdx.x) * blockDim.y; row0 < rows; row0 += static_cast<i64>(gridDim.x) * blockDim.y) {
    const i64 row = row0 + threadIdx.y;
    const bool live = row < rows;
    const i64 off = (live ? row : 0) * cols;
    Pack<T, N> v[P];
#pragma unroll
    for (int j = 0; j < P; j++) {
      const i64 i = threadIdx.x + static_cast<i64>(j) * stride;
      if (live && i < nvec) v[j] = load_row<T, N>(x + off, i);
    }
    if (a != nullptr) {
      Pack<T, N> q[P];
#pragma unroll
      for (int j = 0; j < P; j++) {
        const i64 i = threadIdx.x + static_cast<i64>(j) * stride;
        if (live && i < nvec) q[j] = load_row<T, N>(a + off, i);
      }
      rms_rows_add<T, N, P>(v, q, hout, off, nvec, live);
    }
    rms_rows_normalize<T, N, P>(v, w, y, rstd, row, off, nvec, cols, eps, live, red);
  }
}

// The forward for grids that loop over rows (a few blocks per multiprocessor): each thread loads its next row (and
// residual) into registers before working on the current one, so a row's loads are in flight during the previous
// row's reduction, arithmetic and stores. The same arithmetic per row as rms_rows_forward.
template <typename T, int N, int P, bool RES>
__device__ __forceinline__ void rms_rows_forward_prefetch(const T* __restrict__ x, const T* __restrict__ a,
                                                          const T* __restrict__ w, T* __restrict__ y, T* __restrict__ hout,
                                                          float* __restrict__ rstd, i64 rows, i64 nvec, i64 cols, float eps) {
  __shared__ float red[8 * 32];
  const int stride = blockDim.x;
  const i64 step = static_cast<i64>(gridDim.x) * blockDim.y;
  Pack<T, N> v[P], q[RES ? P : 1];
  i64 row0 = static_cast<i64>(blockIdx.x) * blockDim.y;
  {
    const i64 row = row0 + threadIdx.y;
    const bool live = row < rows;
    const i64 off = (live ? row : 0) * cols;
#pragma unroll
    for (int j = 0; j < P; j++) {
      const i64 i = threadIdx.x + static_cast<i64>(j) * stride;
      if (live && i < nvec) {
        v[j] = load_row<T, N>(x + off, i);
        if constexpr (RES) q[j] = load_row<T, N>(a + off, i);
      }
    }
  }
  for (; row0 < rows; row0 += step) {
    const i64 row = row0 + threadIdx.y;
    const bool live = row < rows;
    const i64 off = (live ? row : 0) * cols;
    const i64 next = row + step;
    const bool more = next < rows;
    const i64 noff = (more ? next : 0) * cols;
    Pack<T, N> nv[P], nq[RES ? P : 1];
#pragma unroll
    for (int j = 0; j < P; j++) {
      const i64 i = threadIdx.x + static_cast<i64>(j) * stride;
      if (more && i < nvec) {
        nv[j] = load_row<T, N>(x + noff, i);
        if constexpr (RES) nq[j] = load_row<T, N>(a + noff, i);
      }
    }
    if constexpr (RES) rms_rows_add<T, N, P>(v, q, hout, off, nvec, live);
    rms_rows_normalize<T, N, P>(v, w, y, rstd, row, off, nvec, cols, eps, live, red);
#pragma unroll
    for (int j = 0; j < P; j++) {
      v[j] = nv[j];
      if constexpr (RES) q[j] = nq[j];
    }
  }
}

// dx = rstd · (g − ĥ · mean(g · ĥ)), g = dy · w, ĥ = h · rstd; with dres (h's own gradient): dx = cast(dres + cast(·)).
// Rows stride by gridDim.x · R (the same trip count in the whole block: row_sum may synchronise it). DW: each thread
// sums dy · cast(ĥ) of its columns over its rows in registers; the block's R row slots are added in order in shared
// memory (cols floats, dynamic) and written to dw_partial[blockIdx.x] for the column reduce.
template <typename T, int N, int P, bool DW, bool RES, bool PF>
__device__ __forceinline__ void rms_rows_backward(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                                  const float* __restrict__ rstd, const T* __restrict__ dres,
                                                  T* __restrict__ dx, float* __restrict__ dw_partial, i64 rows, i64 nvec,
                                                  i64 cols) {
  __shared__ float red[8 * 32];
  const int stride = blockDim.x;
  const float inv_cols = 1.f / static_cast<float>(cols);
  float acc[DW ? P : 1][DW ? N : 1];
  if constexpr (DW) {
#pragma unroll
    for (int j = 0; j < P; j++) {
#pragma unroll
      for (int k = 0; k < N; k++) acc[j][k] = 0.f;
    }
  }
  const i64 step = static_cast<i64>(gridDim.x) * blockDim.y;
  // Every load of a row from memory is issued before its reduction (x, dy and, with RES, h's gradient); with PF the
  // next row's loads are issued before this row's work. The weight (shared by all rows, an L1 hit) is read again after
  // the reduction rather than kept in registers.
  Pack<T, N> xp[P], gp[P], rp[RES ? P : 1];
  float r = 0.f;
  i64 row0 = static_cast<i64>(blockIdx.x) * blockDim.y;
  if constexpr (PF) {
    const i64 row = row0 + threadIdx.y;
    const bool live = row < rows;
    const i64 off = (live ? row : 0) * cols;
    if (live) r = rstd[row];
#pragma unroll
    for (int j = 0; j < P; j++) {
      const i64 i = threadIdx.x + static_cast<i64>(j) * stride;
      if (live && i < nvec) {
        xp[j] = load_row<T, N>(x + off, i);
        gp[j] = load_row<T, N>(dy + off, i);
        if constexpr (RES) rp[j] = load_row<T, N>(dres + off, i);
      }
    }
  }
  for (; row0 < rows; row0 += step) {
    const i64 row = row0 + threadIdx.y;
    const bool live = row < rows;
    const i64 off = (live ? row : 0) * cols;
    if constexpr (!PF) {
      r = live ? rstd[row] : 0.f;
#pragma unroll
      for (int j = 0; j < P; j++) {
        const i64 i = threadIdx.x + static_cast<i64>(j) * stride;
        if (live && i < nvec) {
          xp[j] = load_row<T, N>(x + off, i);
          gp[j] = load_row<T, N>(dy + off, i);
          if constexpr (RES) rp[j] = load_row<T, N>(dres + off, i);
        }
      }
    }
    Pack<T, N> nx[PF ? P : 1], ng[PF ? P : 1], nr[PF && RES ? P : 1];
    float nrs = 0.f;
    if constexpr (PF) {
      const i64 next = row + step;
      const bool more = next < rows;
      const i64 noff = (more ? next : 0) * cols;
      if (more) nrs = rstd[next];
#pragma unroll
      for (int j = 0; j < P; j++) {
        const i64 i = threadIdx.x + static_cast<i64>(j) * stride;
        if (more && i < nvec) {
          nx[j] = load_row<T, N>(x + noff, i);
          ng[j] = load_row<T, N>(dy + noff, i);
          if constexpr (RES) nr[j] = load_row<T, N>(dres + noff, i);
        }
      }
    }
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < P; j++) {
      const i64 i = threadIdx.x + static_cast<i64>(j) * stride;
      if (live && i < nvec) {
        const Pack<T, N> wp = load_pack<T, N>(w, i);
#pragma unroll
        for (int k = 0; k < N; k++) dot += elem<T, N>(gp[j], k) * elem<T, N>(wp, k) * (elem<T, N>(xp[j], k) * r);
      }
    }
    const float mean_dot = row_sum(dot, red) * inv_cols;
    if (live) {
#pragma unroll
      for (int j = 0; j < P; j++) {
        const i64 i = threadIdx.x + static_cast<i64>(j) * stride;
        if (i < nvec) {
          const Pack<T, N> wp = load_pack<T, N>(w, i);
          Pack<T, N> o;
#pragma unroll
          for (int k = 0; k < N; k++) {
            const float xh = elem<T, N>(xp[j], k) * r;
            const float d = elem<T, N>(gp[j], k);
            const float g = d * elem<T, N>(wp, k);
            const float n = r * (g - xh * mean_dot);
            if constexpr (RES) o.v[k] = Cvt<T>::from(elem<T, N>(rp[j], k) + round_to<T>(n));
            else o.v[k] = Cvt<T>::from(n);
            if constexpr (DW) acc[j][k] += d * round_to<T>(xh);
          }
          store_pack<T, N>(dx + off, i, o);
        }
      }
    }
    if constexpr (PF) {
      r = nrs;
#pragma unroll
      for (int j = 0; j < P; j++) {
        xp[j] = nx[j];
        gp[j] = ng[j];
        if constexpr (RES) rp[j] = nr[j];
      }
    }
  }
  if constexpr (DW) {
    extern __shared__ float sacc[];
    for (u32 s = 0; s < blockDim.y; s++) {
      if (threadIdx.y == s) {
#pragma unroll
        for (int j = 0; j < P; j++) {
          const i64 i = threadIdx.x + static_cast<i64>(j) * stride;
          if (i < nvec) {
#pragma unroll
            for (int k = 0; k < N; k++) sacc[i * N + k] = (s == 0 ? 0.f : sacc[i * N + k]) + acc[j][k];
          }
        }
      }
      __syncthreads();
    }
    float* out = dw_partial + static_cast<i64>(blockIdx.x) * cols;
    for (i64 c = static_cast<i64>(threadIdx.y) * blockDim.x + threadIdx.x; c < cols; c += static_cast<i64>(blockDim.x) * blockDim.y)
      out[c] = sacc[c];
  }
}

// The residual forward in fused.cu's block-per-row layout (one block of 32..512 threads per row, a pack per thread per
// pass: many small blocks keep the most loads in flight, call B: 29 us for the plain norm at 8192 x 2048 bf16 where the
// row-per-warp forward took 33): h = cast(x + a) written, y = w · cast(h · rstd). The sum of squares in the order of
// lh_rms_norm_fwd, so y and rstd are its bits for h. Rows of at most blockDim.x packs keep h in registers; wider rows
// read their own h back in the second pass. Without a (null) it is the plain norm of x (h = x, hout null: not written),
// which saves lh_rms_norm_fwd's second read of the row.
template <typename T, int N>
__device__ __forceinline__ void rms_block_forward_res(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ w,
                                                      T* __restrict__ y, T* __restrict__ hout, float* __restrict__ rstd,
                                                      i64 nvec, i64 cols, float eps) {
  __shared__ float red[32];
  const i64 row = blockIdx.x;
  const i64 off = row * cols;
  if (nvec <= static_cast<i64>(blockDim.x)) {
    const i64 i = threadIdx.x;
    const bool in = i < nvec;
    Pack<T, N> h, wp;
    float ss = 0.f;
    if (in) {
      const Pack<T, N> p = load_pack<T, N>(x + off, i);
      wp = load_pack<T, N>(w, i);
      if (a != nullptr) {
        const Pack<T, N> q = load_pack<T, N>(a + off, i);
#pragma unroll
        for (int k = 0; k < N; k++) h.v[k] = Cvt<T>::from(Cvt<T>::to(p.v[k]) + Cvt<T>::to(q.v[k]));
      } else {
        h = p;
      }
      if (hout != nullptr) store_pack<T, N>(hout + off, i, h);
#pragma unroll
      for (int k = 0; k < N; k++) {
        const float f = Cvt<T>::to(h.v[k]);
        ss += f * f;
      }
    }
    ss = block_sum(ss, red);
    const float r = rsqrtf(ss / static_cast<float>(cols) + eps);
    if (rstd != nullptr && threadIdx.x == 0) rstd[row] = r;
    if (in) {
      Pack<T, N> o;
#pragma unroll
      for (int k = 0; k < N; k++) o.v[k] = Cvt<T>::from(round_to<T>(Cvt<T>::to(h.v[k]) * r) * Cvt<T>::to(wp.v[k]));
      store_pack<T, N>(y + off, i, o);
    }
    return;
  }
  float ss = 0.f;
  for (i64 i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Pack<T, N> p = load_pack<T, N>(x + off, i);
    Pack<T, N> h = p;
    if (a != nullptr) {
      const Pack<T, N> q = load_pack<T, N>(a + off, i);
#pragma unroll
      for (int k = 0; k < N; k++) h.v[k] = Cvt<T>::from(Cvt<T>::to(p.v[k]) + Cvt<T>::to(q.v[k]));
    }
    if (hout != nullptr) store_pack<T, N>(hout + off, i, h);
#pragma unroll
    for (int k = 0; k < N; k++) {
      const float f = Cvt<T>::to(h.v[k]);
      ss += f * f;
    }
  }
  ss = block_sum(ss, red);
  const float r = rsqrtf(ss / static_cast<float>(cols) + eps);
  if (rstd != nullptr && threadIdx.x == 0) rstd[row] = r;
  for (i64 i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Pack<T, N> h = load_pack<T, N>(hout != nullptr ? hout + off : x + off, i);  // this thread's own store of the first pass (or x)
    const Pack<T, N> wp = load_pack<T, N>(w, i);
    Pack<T, N> o;
#pragma unroll
    for (int k = 0; k < N; k++) o.v[k] = Cvt<T>::from(round_to<T>(Cvt<T>::to(h.v[k]) * r) * Cvt<T>::to(wp.v[k]));
    store_pack<T, N>(y + off, i, o);
  }
}

#define LH_RMS_BLOCK(T, S)                                                                                                \
  extern "C" __global__ void lh_rms_block_fwd_res_##S(const T* x, const T* a, const T* w, T* y, T* h, float* rstd,       \
                                                      i64 nvec, i64 cols, float eps) { lh_grid_dependency_sync();                                  \
    rms_block_forward_res<T, 16 / sizeof(T)>(x, a, w, y, h, rstd, nvec, cols, eps);                                       \
  }

LH_RMS_BLOCK(float, f32)
LH_RMS_BLOCK(f16, f16)
LH_RMS_BLOCK(bf16, bf16)

// Backward entry points per (dw, residual) variant: each kernel gets the registers and shared memory of its own
// variant only (static shared arrays of inlined functions add up within one kernel).
#define LH_RMS_ROWS_BWD(T, S, P, DW, RES)                                                                                 \
  extern "C" __global__ void lh_rms_rows_bwd_##S##_##P##_##DW##RES(const T* dy, const T* x, const T* w, const float* rstd, \
                                                                   const T* dres, T* dx, float* dw_partial, i64 rows,    \
                                                                   i64 nvec, i64 cols) { lh_grid_dependency_sync();                                 \
    rms_rows_backward<T, 16 / sizeof(T), P, DW == 1, RES == 1, false>(dy, x, w, rstd, dres, dx, dw_partial, rows, nvec,    \
                                                                      cols);                                             \
  }

// The prefetching backward (no dw): for grids that loop over rows.
#define LH_RMS_ROWS_BWDP(T, S, P, RES)                                                                                    \
  extern "C" __global__ void lh_rms_rows_bwdp_##S##_##P##_##RES(const T* dy, const T* x, const T* w, const float* rstd,   \
                                                                const T* dres, T* dx, float* dw_partial, i64 rows,       \
                                                                i64 nvec, i64 cols) { lh_grid_dependency_sync();                                    \
    rms_rows_backward<T, 16 / sizeof(T), P, false, RES == 1, true>(dy, x, w, rstd, dres, dx, dw_partial, rows, nvec, cols); \
  }

#define LH_RMS_ROWS(T, S, P)                                                                                              \
  extern "C" __global__ void lh_rms_rows_fwd_##S##_##P(const T* x, const T* a, const T* w, T* y, T* h, float* rstd,      \
                                                       i64 rows, i64 nvec, i64 cols, float eps) { lh_grid_dependency_sync();                       \
    rms_rows_forward<T, 16 / sizeof(T), P>(x, a, w, y, h, rstd, rows, nvec, cols, eps);                                   \
  }                                                                                                                       \
  extern "C" __global__ void lh_rms_rows_fwdp_##S##_##P##_0(const T* x, const T* a, const T* w, T* y, T* h, float* rstd, \
                                                           i64 rows, i64 nvec, i64 cols, float eps) { lh_grid_dependency_sync();                   \
    rms_rows_forward_prefetch<T, 16 / sizeof(T), P, false>(x, a, w, y, h, rstd, rows, nvec, cols, eps);                   \
  }                                                                                                                       \
  extern "C" __global__ void lh_rms_rows_fwdp_##S##_##P##_1(const T* x, const T* a, const T* w, T* y, T* h, float* rstd, \
                                                           i64 rows, i64 nvec, i64 cols, float eps) { lh_grid_dependency_sync();                   \
    rms_rows_forward_prefetch<T, 16 / sizeof(T), P, true>(x, a, w, y, h, rstd, rows, nvec, cols, eps);                    \
  }                                                                                                                       \
  LH_RMS_ROWS_BWD(T, S, P, 0, 0) LH_RMS_ROWS_BWD(T, S, P, 0, 1) LH_RMS_ROWS_BWD(T, S, P, 1, 0) LH_RMS_ROWS_BWD(T, S, P, 1, 1) \
  LH_RMS_ROWS_BWDP(T, S, P, 0) LH_RMS_ROWS_BWDP(T, S, P, 1)

#define LH_RMS_ROWS_ALL(T, S) LH_RMS_ROWS(T, S, 2) LH_RMS_ROWS(T, S, 4) LH_RMS_ROWS(T, S, 8)

LH_RMS_ROWS_ALL(float, f32)
LH_RMS_ROWS_ALL(f16, f16)
LH_RMS_ROWS_ALL(bf16, bf16)
""";

    // For comparison: LORAHUB_RMSNORM_ROWS_ASM=0 plain loads and conversions (the compiler may then read rows twice);
    // LORAHUB_RMSNORM_ROWS_CG=0 rows read through L1.
    private static readonly CudaProgram program = new("rms_norm_rows.cu", Source, null,
        [Environment.GetEnvironmentVariable("LORAHUB_RMSNORM_ROWS_ASM")?.Trim() == "0" ? "-DLH_ROWS_ASM=0" : "-DLH_ROWS_ASM=1",
         Environment.GetEnvironmentVariable("LORAHUB_RMSNORM_ROWS_CG")?.Trim() == "0" ? "-DLH_ROWS_CG=0" : "-DLH_ROWS_CG=1"],
        dependentLaunch: true);

    private static int EnvInt(string name, int fallback, int min, int max) =>
        int.TryParse(Environment.GetEnvironmentVariable(name), out var v) && v >= min && v <= max ? v : fallback;

    /// <summary>
    /// Whether the forward (plain and residual) runs row-per-warp (LORAHUB_RMSNORM_ROWS_FWD=1). Off by default: on an
    /// H200 (call B, 8192 × 2048 bf16) it took 33 us where fused.cu's block-per-row kernel takes 29, so the plain forward
    /// stays there and the residual forward takes lh_rms_block_fwd_res (the same layout). The row backward is faster
    /// (31 vs 35 us; 45 with the residual's gradient vs 35 + a 21 us add) and stays on.
    /// </summary>
    public static bool ForwardRows { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_RMSNORM_ROWS_FWD")?.Trim() == "1";

    /// <summary>Rows per block when a row takes one warp (1..8; LORAHUB_RMSNORM_ROWS_PER_BLOCK, default 4).</summary>
    public static int RowsPerBlock { get; set; } = EnvInt("LORAHUB_RMSNORM_ROWS_PER_BLOCK", 4, 1, 8);

    /// <summary>
    /// 0 (default): a block per RowsPerBlock rows. N: at most N blocks per multiprocessor, each looping over rows
    /// (LORAHUB_RMSNORM_ROWS_BLOCKS_PER_SM). The backward with dw always loops, with 4 blocks per multiprocessor.
    /// </summary>
    public static int BlocksPerSm { get; set; } = EnvInt("LORAHUB_RMSNORM_ROWS_BLOCKS_PER_SM", 0, 0, 64);

    /// <summary>
    /// With <see cref="BlocksPerSm"/>, whether the forward and the backward without dw load each thread's next row
    /// while working on the current one (default on; LORAHUB_RMSNORM_ROWS_PREFETCH=0: off).
    /// </summary>
    public static bool Prefetch { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_RMSNORM_ROWS_PREFETCH")?.Trim() != "0";

    /// <summary>Whether these kernels may be used (default on; LORAHUB_RMSNORM_ROWS_KERNEL=0: off, fused.cu's kernels run).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_RMSNORM_ROWS_KERNEL")?.Trim() != "0";

    private static long launches, residualLaunches;

    /// <summary>Launches of these kernels so far, forward and backward (tests: a silent fallback must not pass).</summary>
    public static long Launches => Interlocked.Read(ref launches);

    /// <summary>The launches among <see cref="Launches"/> with a residual (add_rms_norm's forward and backward).</summary>
    public static long ResidualLaunches => Interlocked.Read(ref residualLaunches);

    /// <summary>Why the kernels are off after a failed compile (null: they compiled, or were not tried).</summary>
    public static string? CompileFailure => program.CompileFailure;

    /// <summary>
    /// Widest row: 4 warps of 8 packs per lane (4,096 fp32 or 8,192 fp16/bf16 values); a block of 128 threads fits the
    /// registers of every variant. Wider rows take fused.cu's kernels.
    /// </summary>
    private const long MaxPacks = 4 * 32 * 8;

    /// <summary>Threads of a row (32·W), rows per block (R) and packs per thread (P) for a row of nvec 16-byte packs.</summary>
    internal readonly record struct Shape(int Warps, int Rows, int Packs)
    {
        public Dim3 Block => new((uint)(32 * Warps), (uint)Rows);
    }

    internal static Shape ShapeFor(long nvec)
    {
        var warps = (int)Math.Max(1, (nvec + 255) / 256);
        var packs = 2;
        while (packs < 8 && 32L * warps * packs < nvec) packs *= 2;
        var rows = warps == 1 ? RowsPerBlock : Math.Max(1, 4 / warps);
        return new Shape(warps, rows, packs);
    }

    /// <summary>
    /// True when these kernels run for rows of <paramref name="cols"/> elements of the tensors' dtype at these pointers:
    /// switched on, compiled for the device, rows a whole number of 16-byte packs (at most <see cref="MaxPacks"/>), every
    /// pointer 16-byte aligned.
    /// </summary>
    public static bool Applies(Tensor on, long cols, params Tensor?[] tensors)
    {
        if (!Enabled || !Usable(on)) return false;
        var v = VectorWidth(on.dtype);
        if (cols % v != 0 || cols / v > MaxPacks) return false;
        foreach (var t in tensors)
            if (t is not null && !Aligned16(Ptr(t))) return false;
        return program.Compiles(DeviceIndex(on), "the block-per-row RMSNorm kernels run instead");
    }

    /// <summary>
    /// True when lh_rms_block_fwd_res runs for rows of <paramref name="cols"/> elements at these pointers: switched on,
    /// compiled, rows a whole number of 16-byte packs, every pointer 16-byte aligned.
    /// </summary>
    public static bool BlockApplies(Tensor on, long cols, params Tensor?[] tensors)
    {
        if (!Enabled || !Usable(on)) return false;
        if (cols % VectorWidth(on.dtype) != 0) return false;
        foreach (var t in tensors)
            if (t is not null && !Aligned16(Ptr(t))) return false;
        return program.Compiles(DeviceIndex(on), "the block-per-row RMSNorm kernels run instead");
    }

    /// <summary>h = x + a and y (rows × cols contiguous), one block per row as fused.cu's forward; call after <see cref="BlockApplies"/>.</summary>
    public static void BlockResidualForward(Tensor x, Tensor a, Tensor w, Tensor y, Tensor h, Tensor rstd, long rows, long cols, float eps)
    {
        if (BlockLaunch(x, a, w, y, h, rstd, rows, cols, eps)) Interlocked.Increment(ref residualLaunches);
    }

    /// <summary>
    /// The plain norm y = w · cast(x · rstd) by the same block-per-row kernel (the row kept in registers where fused.cu's
    /// lh_rms_norm_fwd reads it twice; the same bits); call after <see cref="BlockApplies"/>.
    /// </summary>
    public static void BlockForward(Tensor x, Tensor w, Tensor y, Tensor rstd, long rows, long cols, float eps) =>
        BlockLaunch(x, null, w, y, null, rstd, rows, cols, eps);

    // False where there is nothing to launch (no rows).
    private static bool BlockLaunch(Tensor x, Tensor? a, Tensor w, Tensor y, Tensor? h, Tensor rstd, long rows, long cols, float eps)
    {
        if (rows == 0) return false;
        var nvec = cols / VectorWidth(x.dtype);
        var threads = (int)Math.Clamp((nvec + 31) / 32 * 32, 64, 512); // FusedKernels' choice for lh_rms_norm_fwd: its sum order
        program.Function(DeviceIndex(x), $"lh_rms_block_fwd_res_{Suffix(x.dtype)}").Launch(rows, threads, 0, new KernelArgs()
            .Ptr(Ptr(x)).Ptr(a is null ? IntPtr.Zero : Ptr(a)).Ptr(Ptr(w)).Ptr(Ptr(y)).Ptr(h is null ? IntPtr.Zero : Ptr(h)).Ptr(Ptr(rstd))
            .I64(nvec).I64(cols).F32(eps));
        Interlocked.Increment(ref launches);
        return true;
    }

    private static string Name(string op, Tensor on, Shape s) => $"lh_rms_rows_{op}_{Suffix(on.dtype)}_{s.Packs}";

    private static string BackwardName(Tensor on, Shape s, bool dw, bool residual) =>
        $"lh_rms_rows_bwd_{Suffix(on.dtype)}_{s.Packs}_{(dw ? 1 : 0)}{(residual ? 1 : 0)}";

    /// <summary>y (and h = x + a when <paramref name="a"/> is given) and rstd for rows × cols contiguous tensors; call after <see cref="Applies"/>.</summary>
    public static void Forward(Tensor x, Tensor? a, Tensor w, Tensor y, Tensor? h, Tensor rstd, long rows, long cols, float eps)
    {
        if (rows == 0) return;
        var nvec = cols / VectorWidth(x.dtype);
        var s = ShapeFor(nvec);
        var name = BlocksPerSm > 0 && Prefetch
            ? $"lh_rms_rows_fwdp_{Suffix(x.dtype)}_{s.Packs}_{(a is null ? 0 : 1)}"
            : Name("fwd", x, s);
        program.Function(DeviceIndex(x), name).Launch(Grid(x, rows, s), s.Block, 0, new KernelArgs()
            .Ptr(Ptr(x)).Ptr(a is null ? IntPtr.Zero : Ptr(a)).Ptr(Ptr(w)).Ptr(Ptr(y)).Ptr(h is null ? IntPtr.Zero : Ptr(h))
            .Ptr(Ptr(rstd)).I64(rows).I64(nvec).I64(cols).F32(eps));
        Interlocked.Increment(ref launches);
        if (a is not null) Interlocked.Increment(ref residualLaunches);
    }

    /// <summary>
    /// Blocks of the backward launch: one per R rows without dw; with dw about 4 per multiprocessor (each writes a
    /// cols-float partial for <see cref="FusedKernels.RmsNormWeightGradReduce"/>).
    /// </summary>
    public static int BackwardBlocks(Tensor on, long rows, long cols, bool weightGrad)
    {
        var s = ShapeFor(cols / VectorWidth(on.dtype));
        if (!weightGrad) return Grid(on, rows, s);
        var sms = CudaKernels.MultiprocessorCount(DeviceIndex(on));
        return (int)Math.Clamp((rows + s.Rows - 1) / s.Rows, 1, 4L * sms);
    }

    // A block per s.Rows rows, or with BlocksPerSm at most that many per multiprocessor (the kernels loop over rows).
    private static int Grid(Tensor on, long rows, Shape s)
    {
        var needed = (rows + s.Rows - 1) / s.Rows;
        var cap = BlocksPerSm > 0 ? (long)BlocksPerSm * CudaKernels.MultiprocessorCount(DeviceIndex(on)) : int.MaxValue;
        return (int)Math.Clamp(needed, 1, cap);
    }

    /// <summary>
    /// dx for rows × cols contiguous tensors (plus <paramref name="dres"/>, h's own gradient, when given); with
    /// <paramref name="dwPartial"/> (blocks × cols fp32) the per-block dw sums. Call after <see cref="Applies"/>.
    /// </summary>
    public static void Backward(Tensor dy, Tensor x, Tensor w, Tensor rstd, Tensor? dres, Tensor dx, Tensor? dwPartial, int blocks,
        long rows, long cols)
    {
        if (rows == 0) return;
        var nvec = cols / VectorWidth(x.dtype);
        var s = ShapeFor(nvec);
        var shared = dwPartial is null ? 0 : (int)(cols * sizeof(float));
        var name = dwPartial is null && BlocksPerSm > 0 && Prefetch
            ? $"lh_rms_rows_bwdp_{Suffix(x.dtype)}_{s.Packs}_{(dres is null ? 0 : 1)}"
            : BackwardName(x, s, dwPartial is not null, dres is not null);
        program.Function(DeviceIndex(x), name).Launch(blocks, s.Block, shared, new KernelArgs()
            .Ptr(Ptr(dy)).Ptr(Ptr(x)).Ptr(Ptr(w)).Ptr(Ptr(rstd)).Ptr(dres is null ? IntPtr.Zero : Ptr(dres)).Ptr(Ptr(dx))
            .Ptr(dwPartial is null ? IntPtr.Zero : Ptr(dwPartial)).I64(rows).I64(nvec).I64(cols));
        Interlocked.Increment(ref launches);
        if (dres is not null) Interlocked.Increment(ref residualLaunches);
    }
}
