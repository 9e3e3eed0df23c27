// lh_common.cuh: what LoRAHub's kernels share. Programs include it as "lh_common.cuh"; it is compiled by NVRTC at run
// time with no CUDA toolkit header (their set differs between NVRTC versions), so fp16 and bf16 are 16-bit integers
// here with explicit conversions by the PTX cvt instructions cuda_fp16.h and cuda_bf16.h themselves use (bf16 before
// sm_80 by bit operations; round to nearest even throughout). Arithmetic is fp32 in registers.
#pragma once

#ifndef __forceinline__
#define __forceinline__ __inline__ __attribute__((always_inline))
#endif

typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct bf16 {
  u16 bits;
};
struct f16 {
  u16 bits;
};

// Programmatic dependent launch (sm_90+; Cuda/DependentLaunch.cs). Every kernel of a program built with dependentLaunch
// calls this first: launched so, a kernel may be scheduled before the kernel ahead of it on the stream has finished, and
// waits here until that kernel's writes are visible (so nothing before this line may touch global memory); then it lets
// the kernel after it be scheduled likewise, which waits the same way. Older GPUs and plain launches return at once.
__device__ __forceinline__ void lh_grid_dependency_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Element type codes shared with the C# launchers.
#define LH_F32 0
#define LH_F16 1
#define LH_BF16 2

__device__ __forceinline__ float bf16_to_float(u16 b) { return __uint_as_float(((u32)b) << 16); }

// Round to nearest even. sm_80+: the hardware's conversion, one instruction where the bit operations take five (kernels
// that round every element, e.g. the RMSNorm rows, were bound by instruction issue); the same bits but for NaN payloads,
// which come out as the canonical quiet NaN 0x7fff instead of the input's payload. LH_BF16_BIT_ROUNDING (set by the host
// for LORAHUB_BF16_BIT_ROUNDING=1): the bit operations everywhere.
__device__ __forceinline__ u16 float_to_bf16(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(LH_BF16_BIT_ROUNDING)
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
#else
  u32 u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
#endif
}

__device__ __forceinline__ float f16_to_float(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ u16 float_to_f16(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <> struct Cvt<f16> {
  static __device__ __forceinline__ float to(f16 v) { return f16_to_float(v.bits); }
  static __device__ __forceinline__ f16 from(float v) {
    f16 r;
    r.bits = float_to_f16(v);
    return r;
  }
};
template <> struct Cvt<bf16> {
  static __device__ __forceinline__ float to(bf16 v) { return bf16_to_float(v.bits); }
  static __device__ __forceinline__ bf16 from(float v) {
    bf16 r;
    r.bits = float_to_bf16(v);
    return r;
  }
};

// Two values rounded to T (bf16 or f16) as one 32-bit pair, lo in the lower half (the element at the lower address). On
// sm_80+ one cvt.rn.{bf16,f16}x2.f32 a pair: the bits of the per-value conversions but for NaN payloads (canonical), in
// half the instructions, which decided the speed of kernels that round every element they write. Elsewhere, and bf16
// under LH_BF16_BIT_ROUNDING, the per-value conversions.
template <typename T> __device__ __forceinline__ u32 lh_round_pair(float lo, float hi);
template <> __device__ __forceinline__ u32 lh_round_pair<bf16>(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(LH_BF16_BIT_ROUNDING)
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return (u32)float_to_bf16(lo) | ((u32)float_to_bf16(hi) << 16);
#endif
}
template <> __device__ __forceinline__ u32 lh_round_pair<f16>(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return (u32)float_to_f16(lo) | ((u32)float_to_f16(hi) << 16);
#endif
}

// Rounds a float to T and back: the value the composite path would hold in a T tensor.
template <typename T> __device__ __forceinline__ float round_to(float v) { return Cvt<T>::to(Cvt<T>::from(v)); }

// Loads and stores one element of a runtime-chosen type (LH_F32 / LH_F16 / LH_BF16), for multi-tensor kernels.
__device__ __forceinline__ float load_any(const void* p, i64 i, int type) {
  if (type == LH_F32) return static_cast<const float*>(p)[i];
  const u16 b = static_cast<const u16*>(p)[i];
  return type == LH_BF16 ? bf16_to_float(b) : f16_to_float(b);
}

__device__ __forceinline__ void store_any(void* p, i64 i, int type, float v) {
  if (type == LH_F32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<u16*>(p)[i] = type == LH_BF16 ? float_to_bf16(v) : float_to_f16(v);
  }
}

// N consecutive elements moved as one access (16 bytes for N = 16 / sizeof(T)).
template <typename T, int N> struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N> __device__ __forceinline__ Pack<T, N> load_pack(const T* p, i64 i) {
  return reinterpret_cast<const Pack<T, N>*>(p)[i];
}

template <typename T, int N> __device__ __forceinline__ void store_pack(T* p, i64 i, const Pack<T, N>& v) {
  reinterpret_cast<Pack<T, N>*>(p)[i] = v;
}

// N fp32 values rounded to T as one pack: the per-value conversions, bf16 a pair at a time (lh_round_pair, element 2i in
// the low half of word i; the same bits in half the instructions, which decided kernels bound by instruction issue).
template <typename T, int N> struct LhRoundPack {
  static __device__ __forceinline__ Pack<T, N> run(const float (&v)[N]) {
    Pack<T, N> o;
#pragma unroll
    for (int k = 0; k < N; k++) o.v[k] = Cvt<T>::from(v[k]);
    return o;
  }
};
template <int N> struct LhRoundPack<bf16, N> {
  static __device__ __forceinline__ Pack<bf16, N> run(const float (&v)[N]) {
    Pack<bf16, N> o;
    u32* words = reinterpret_cast<u32*>(o.v);
#pragma unroll
    for (int k = 0; k < N / 2; k++) words[k] = lh_round_pair<bf16>(v[2 * k], v[2 * k + 1]);
    if (N % 2 == 1) o.v[N - 1] = Cvt<bf16>::from(v[N - 1]);
    return o;
  }
};
template <typename T, int N> __device__ __forceinline__ Pack<T, N> lh_round_pack(const float (&v)[N]) { return LhRoundPack<T, N>::run(v); }

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

// Σ_b partial[b, j] of a (blocks × cols) fp32 table of per-block partial sums, for the column j = blockIdx.x·32 +
// threadIdx.x (blocks of 32 × 8 threads: threadIdx.y takes every 8th partial row). The sum is valid where threadIdx.y
// is 0 and j < cols (0 elsewhere); every thread of the block must call it (one __syncthreads inside).
__device__ __forceinline__ float column_sum(const float* __restrict__ partial, int blocks, i64 cols) {
  __shared__ float tile[8][33];
  const i64 j = static_cast<i64>(blockIdx.x) * 32 + threadIdx.x;
  float s = 0.f;
  if (j < cols) {
    for (int b = threadIdx.y; b < blocks; b += 8) s += partial[static_cast<i64>(b) * cols + j];
  }
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.y == 0 && j < cols) {
#pragma unroll
    for (int i = 0; i < 8; i++) total += tile[i][threadIdx.x];
  }
  return total;
}
