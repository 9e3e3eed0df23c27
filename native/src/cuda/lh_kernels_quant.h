// Launchers of the 4-bit dequantization kernels (lh_quant_kernels.cu). Plain C++ over raw device pointers, so the
// torch-side .cpp files include this without CUDA device headers; called from lh_quant.cpp under LH_WITH_CUDA.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace lh_kernels {

// Output element type of a dequantization.
enum QuantOutType { LH_QOUT_F32 = 0, LH_QOUT_F16 = 1, LH_QOUT_BF16 = 2 };

// What a 4-bit weight is made of (see FourBit.cs). All pointers are device pointers on the launch stream's device.
struct FourBitView {
  const uint8_t* packed;        // ceil(numel / blocksize) * blocksize / 2 bytes, first value in the high nibble
  const float* code;            // 16 code values, indexed by the nibbles
  int64_t numel;                // values to produce
  int64_t blocksize;            // values per absmax (even)
  // Either plain fp32 absmax per block ...
  const float* absmax;          // nullptr when double-quantized
  // ... or double quantization: absmax[b] = nested_code[nested_codes[b]] * nested_scales[b / nested_blocksize] + offset
  const uint8_t* nested_codes;
  const float* nested_scales;
  const float* nested_code;     // 256 values
  float nested_offset;
  int64_t nested_blocksize;
};

// out[i] = code[nibble i] × absmax[i / blocksize], each product rounded once to fp32 and then once to the output type
// (bit for bit what the portable libtorch path computes). Returns the launch status.
cudaError_t dequantize_4bit(const FourBitView& w, void* out, QuantOutType out_type, cudaStream_t stream);

}  // namespace lh_kernels
