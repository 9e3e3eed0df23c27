// 4-bit (NF4/FP4) dequantization for QLoRA's Linear4bit: plain CUDA over raw pointers (no torch headers).
// Memory-bound: each thread turns 4 packed bytes into 8 outputs written as one 16-byte store (two for fp32), and reads
// one absmax per 8 outputs. Products use __fmul_rn/__fadd_rn so nvcc cannot contract them into FMAs: the result is
// bit for bit the portable libtorch path (index_select × absmax in fp32, then one rounding to the output type).
#include "lh_kernels_quant.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace lh_kernels {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Eight outputs, stored together (16 bytes for 2-byte types, 32 for fp32; the pointer is 16-byte aligned).
template <typename T>
struct alignas(16) Vec8 {
  T v[8];
};

struct Params {
  FourBitView w;
  int block_shift;   // log2(blocksize), or -1 when it is not a power of two
  int nested_shift;  // log2(nested_blocksize), or -1
};

__device__ __forceinline__ int64_t div_block(int64_t i, int64_t size, int shift) {
  return shift >= 0 ? (i >> shift) : (i / size);
}

// The absmax of block b: stored, or recovered from its 8-bit code (product rounded, then the offset added).
__device__ __forceinline__ float block_absmax(const Params& p, int64_t b, const float* s_nested) {
  if (p.w.absmax != nullptr) return p.w.absmax[b];
  const float scale = p.w.nested_scales[div_block(b, p.w.nested_blocksize, p.nested_shift)];
  return __fadd_rn(__fmul_rn(s_nested[p.w.nested_codes[b]], scale), p.w.nested_offset);
}

__device__ __forceinline__ void load_tables(const Params& p, float* s_code, float* s_nested) {
  for (int i = threadIdx.x; i < 16; i += blockDim.x) s_code[i] = p.w.code[i];
  if (p.w.absmax == nullptr)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_nested[i] = p.w.nested_code[i];
  __syncthreads();
}

// Vector path: numel % 8 == 0, blocksize % 8 == 0, packed 4-byte aligned, out 16-byte aligned.
template <typename T>
__global__ void dequant4_vec8(Params p, T* __restrict__ out) {
  __shared__ float s_code[16];
  __shared__ float s_nested[256];
  load_tables(p, s_code, s_nested);
  const uint32_t* packed = reinterpret_cast<const uint32_t*>(p.w.packed);
  const int64_t units = p.w.numel / 8;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const uint32_t word = packed[u];
    const int64_t first = u * 8;
    const float a = block_absmax(p, div_block(first, p.w.blocksize, p.block_shift), s_nested);
    Vec8<T> v;
#pragma unroll
    for (int k = 0; k < 4; k++) {
      const uint32_t byte = (word >> (8 * k)) & 0xFFu;  // little-endian: byte k of the word is packed[4u + k]
      v.v[2 * k] = from_float<T>(__fmul_rn(s_code[byte >> 4], a));
      v.v[2 * k + 1] = from_float<T>(__fmul_rn(s_code[byte & 0xFu], a));
    }
    reinterpret_cast<Vec8<T>*>(out)[u] = v;
  }
}

// Any size and alignment: one packed byte (two outputs) per thread.
template <typename T>
__global__ void dequant4_scalar(Params p, T* __restrict__ out) {
  __shared__ float s_code[16];
  __shared__ float s_nested[256];
  load_tables(p, s_code, s_nested);
  const int64_t bytes = (p.w.numel + 1) / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < bytes; j += stride) {
    const uint32_t byte = p.w.packed[j];
    const int64_t i = 2 * j;  // both nibbles share a block: blocksize is even
    const float a = block_absmax(p, div_block(i, p.w.blocksize, p.block_shift), s_nested);
    out[i] = from_float<T>(__fmul_rn(s_code[byte >> 4], a));
    if (i + 1 < p.w.numel) out[i + 1] = from_float<T>(__fmul_rn(s_code[byte & 0xFu], a));
  }
}

int log2_exact(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t{1} << s) < v) s++;
  return s;
}

unsigned grid_for(int64_t work) {
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  if (blocks > (int64_t{1} << 20)) blocks = int64_t{1} << 20;  // grid-stride loops cover the rest
  return static_cast<unsigned>(blocks);
}

template <typename T>
cudaError_t launch(const Params& p, void* out, cudaStream_t stream) {
  const bool aligned = (reinterpret_cast<uintptr_t>(p.w.packed) % 4 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  if (aligned && p.w.numel % 8 == 0 && p.w.blocksize % 8 == 0) {
    dequant4_vec8<T><<<grid_for(p.w.numel / 8), kThreads, 0, stream>>>(p, static_cast<T*>(out));
  } else {
    dequant4_scalar<T><<<grid_for((p.w.numel + 1) / 2), kThreads, 0, stream>>>(p, static_cast<T*>(out));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t dequantize_4bit(const FourBitView& w, void* out, QuantOutType out_type, cudaStream_t stream) {
  if (w.numel <= 0) return cudaSuccess;
  if (w.blocksize <= 0 || w.blocksize % 2 != 0 || (w.absmax == nullptr && w.nested_blocksize <= 0)) return cudaErrorInvalidValue;
  Params p;
  p.w = w;
  p.block_shift = log2_exact(w.blocksize);
  p.nested_shift = w.absmax == nullptr ? log2_exact(w.nested_blocksize) : -1;
  switch (out_type) {
    case LH_QOUT_F32: return launch<float>(p, out, stream);
    case LH_QOUT_F16: return launch<__half>(p, out, stream);
    case LH_QOUT_BF16: return launch<__nv_bfloat16>(p, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lh_kernels
