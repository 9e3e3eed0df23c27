// 4-bit (NF4/FP4) dequantization for QLoRA's Linear4bit, over raw pointers. Memory-bound: in the vector kernel each
// thread turns 4 packed bytes into 8 outputs, written together, and reads one absmax per 8 outputs. Products use
// __fmul_rn/__fadd_rn so they cannot be contracted into FMAs: the result is bit for bit the composite TorchSharp path
// (index_select × absmax in fp32, then one rounding to the output type).
//
// A 4-bit weight: packed (ceil(numel / blocksize) · blocksize / 2 bytes, first value in the high nibble), code (16 fp32
// values indexed by the nibbles), and per block of `blocksize` values either an fp32 absmax, or (double quantization)
// absmax[b] = nested_code[nested_codes[b]] · nested_scales[b / nested_blocksize] + nested_offset.
// out[i] = code[nibble i] · absmax[i / blocksize]. Entry points lh_dequant4_<vec8|scalar>_<f32|f16|bf16>.
#include "lh_common.cuh"

struct FourBit {
  const u8* packed;
  const float* code;
  i64 numel;
  i64 blocksize;
  const float* absmax;  // nullptr when double-quantized
  const u8* nested_codes;
  const float* nested_scales;
  const float* nested_code;  // 256 values
  float nested_offset;
  i64 nested_blocksize;
  int block_shift;   // log2(blocksize), or -1 when it is not a power of two
  int nested_shift;  // log2(nested_blocksize), or -1
};

__device__ __forceinline__ i64 div_block(i64 i, i64 size, int shift) { return shift >= 0 ? (i >> shift) : (i / size); }

// The absmax of block b: stored, or recovered from its 8-bit code (product rounded, then the offset added).
__device__ __forceinline__ float block_absmax(const FourBit& p, i64 b, const float* s_nested) {
  if (p.absmax != nullptr) return p.absmax[b];
  const float scale = p.nested_scales[div_block(b, p.nested_blocksize, p.nested_shift)];
  return __fadd_rn(__fmul_rn(s_nested[p.nested_codes[b]], scale), p.nested_offset);
}

__device__ __forceinline__ void load_tables(const FourBit& p, float* s_code, float* s_nested) {
  for (int i = threadIdx.x; i < 16; i += blockDim.x) s_code[i] = p.code[i];
  if (p.absmax == nullptr)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_nested[i] = p.nested_code[i];
  __syncthreads();
}

template <typename T> struct alignas(16) Vec8 {
  T v[8];
};

// Vector path: numel % 8 == 0, blocksize % 8 == 0, packed 4-byte aligned, out 16-byte aligned.
template <typename T>
__device__ __forceinline__ void dequant4_vec8(const FourBit& p, T* __restrict__ out) {
  __shared__ float s_code[16];
  __shared__ float s_nested[256];
  load_tables(p, s_code, s_nested);
  const u32* packed = reinterpret_cast<const u32*>(p.packed);
  const i64 units = p.numel / 8;
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 u = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const u32 word = packed[u];
    const float a = block_absmax(p, div_block(u * 8, p.blocksize, p.block_shift), s_nested);
    Vec8<T> v;
#pragma unroll
    for (int k = 0; k < 4; k++) {
      const u32 byte = (word >> (8 * k)) & 0xFFu;  // little-endian: byte k of the word is packed[4u + k]
      v.v[2 * k] = Cvt<T>::from(__fmul_rn(s_code[byte >> 4], a));
      v.v[2 * k + 1] = Cvt<T>::from(__fmul_rn(s_code[byte & 0xFu], a));
    }
    reinterpret_cast<Vec8<T>*>(out)[u] = v;
  }
}

// Any size and alignment: one packed byte (two outputs) per thread.
template <typename T>
__device__ __forceinline__ void dequant4_scalar(const FourBit& p, T* __restrict__ out) {
  __shared__ float s_code[16];
  __shared__ float s_nested[256];
  load_tables(p, s_code, s_nested);
  const i64 bytes = (p.numel + 1) / 2;
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 j = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; j < bytes; j += stride) {
    const u32 byte = p.packed[j];
    const i64 i = 2 * j;  // both nibbles share a block: blocksize is even
    const float a = block_absmax(p, div_block(i, p.blocksize, p.block_shift), s_nested);
    out[i] = Cvt<T>::from(__fmul_rn(s_code[byte >> 4], a));
    if (i + 1 < p.numel) out[i + 1] = Cvt<T>::from(__fmul_rn(s_code[byte & 0xFu], a));
  }
}

#define LH_DEQUANT_ENTRIES(T, S)                                                                                          \
  extern "C" __global__ void lh_dequant4_vec8_##S(const u8* packed, const float* code, i64 numel, i64 blocksize,          \
                                                  const float* absmax, const u8* nested_codes, const float* nested_scales, \
                                                  const float* nested_code, float nested_offset, i64 nested_blocksize,   \
                                                  int block_shift, int nested_shift, T* out) { lh_grid_dependency_sync();                           \
    const FourBit p{packed, code, numel, blocksize, absmax, nested_codes, nested_scales, nested_code, nested_offset,      \
                    nested_blocksize, block_shift, nested_shift};                                                        \
    dequant4_vec8<T>(p, out);                                                                                            \
  }                                                                                                                      \
  extern "C" __global__ void lh_dequant4_scalar_##S(const u8* packed, const float* code, i64 numel, i64 blocksize,        \
                                                    const float* absmax, const u8* nested_codes, const float* nested_scales, \
                                                    const float* nested_code, float nested_offset, i64 nested_blocksize, \
                                                    int block_shift, int nested_shift, T* out) { lh_grid_dependency_sync();                         \
    const FourBit p{packed, code, numel, blocksize, absmax, nested_codes, nested_scales, nested_code, nested_offset,      \
                    nested_blocksize, block_shift, nested_shift};                                                        \
    dequant4_scalar<T>(p, out);                                                                                          \
  }

LH_DEQUANT_ENTRIES(float, f32)
LH_DEQUANT_ENTRIES(f16, f16)
LH_DEQUANT_ENTRIES(bf16, bf16)
