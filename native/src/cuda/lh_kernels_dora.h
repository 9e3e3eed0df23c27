// Launchers for the fused DoRA output kernels (lh_dora_kernels.cu). Plain CUDA over raw pointers, no torch headers, so
// this header is included from both nvcc and the C++ shim. Every launcher enqueues on the given stream and returns
// cudaSuccess or the launch error (never throws).
//
// The op, per row i and column j of a contiguous (rows × cols) tensor t of dtype T (LH_FUSED_F32/F16/BF16 of
// lh_kernels_fused.h) with the fp32 correction c (cols) and an optional bias b (cols, dtype T):
//   forward   y[i,j]  = t[i,j] + c[j]·(t[i,j] − b[j])           (fp32 registers, rounded once to T)
//   backward  gt[i,j] = g[i,j]·(1 + c[j])
//             gc[j]   = Σ_i g[i,j]·(t[i,j] − b[j]) = Σ_i g[i,j]·(y[i,j] − b[j]) / (1 + c[j])
// Backward reads the forward's output y rather than t (y − b = (1 + c)·(t − b)), so t need not be kept for backward.
// Blocks are 32 × 8 threads: 32 column vectors (16 bytes each where the data allows) by 8 rows; `row_blocks` blocks
// stride down the rows (grid.y). Backward writes per-block column sums (row_blocks × cols floats, all written) that
// lh_launch_dora_grad_c_reduce sums into gc (cols floats), scaled by 1/(1 + c[j]) (0 where 1 + c[j] = 0).
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

cudaError_t lh_launch_dora_forward(int dtype, const void* t, const float* c, const void* bias, void* y, int64_t rows,
                                   int64_t cols, int row_blocks, cudaStream_t stream);

cudaError_t lh_launch_dora_backward(int dtype, const void* g, const void* y, const float* c, const void* bias, void* gt,
                                    float* partial, int64_t rows, int64_t cols, int row_blocks, cudaStream_t stream);

cudaError_t lh_launch_dora_grad_c_reduce(const float* partial, int row_blocks, const float* c, float* gc, int64_t cols,
                                         cudaStream_t stream);
