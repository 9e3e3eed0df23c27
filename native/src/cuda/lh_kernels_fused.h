// Launchers for the fused elementwise/normalisation kernels of a Llama block (lh_fused_kernels.cu).
// Plain CUDA over raw pointers: no torch headers, so this header is included from both nvcc and the C++ shim.
// Every launcher enqueues on the given stream and returns cudaSuccess or the launch error (never throws).
// Element types: LH_FUSED_F32, LH_FUSED_F16, LH_FUSED_BF16; all tensors of one call share it, except the fp32 extras
// (rstd, cos/sin tables, dw partials). Pointers to 16-byte-aligned data with compatible sizes take 128-bit loads.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

enum LhFusedDType { LH_FUSED_F32 = 0, LH_FUSED_F16 = 1, LH_FUSED_BF16 = 2 };

// Largest hidden size the RMSNorm backward handles (its per-block dw accumulator lives in 48 KB of shared memory).
#define LH_RMS_NORM_MAX_COLS 12000

// y[r, :] = w · cast(x[r, :] · rstd[r]), rstd[r] = 1/sqrt(mean(x[r, :]²) + eps), one block per row.
// w may be null (no weight); rstd (rows floats) receives the per-row reciprocal RMS for backward (may be null).
cudaError_t lh_launch_rms_norm_forward(int dtype, const void* x, const void* w, void* y, float* rstd, int64_t rows,
                                       int64_t cols, float eps, cudaStream_t stream);

// dx = rstd · (g − x̂ · mean(g · x̂)), g = dy · w, x̂ = x · rstd. When dw_partial is non-null it must hold
// blocks × cols floats; each of `blocks` blocks writes its rows' sum of dy · cast(x̂) there, and
// lh_launch_rms_norm_dw_reduce then sums the partials into dw (cols elements of dtype).
cudaError_t lh_launch_rms_norm_backward(int dtype, const void* dy, const void* x, const void* w, const float* rstd, void* dx,
                                        float* dw_partial, int blocks, int64_t rows, int64_t cols, cudaStream_t stream);
cudaError_t lh_launch_rms_norm_dw_reduce(int dtype, const float* dw_partial, int blocks, void* dw, int64_t cols,
                                         cudaStream_t stream);

// SwiGLU over n contiguous elements: y = silu(g) · u; backward dg, du from dy.
cudaError_t lh_launch_swiglu_forward(int dtype, const void* g, const void* u, void* y, int64_t n, cudaStream_t stream);
cudaError_t lh_launch_swiglu_backward(int dtype, const void* dy, const void* g, const void* u, void* dg, void* du, int64_t n,
                                      cudaStream_t stream);

// Rotary embedding (rotate_half convention) over x of shape (B, H, T, D) with unit stride along D and element strides
// xs/ys = {batch, head, seq} for input and output; cos/sin are fp32 (T, D) tables with row stride cs.
// Forward: y = x·cos + rotate_half(x)·sin. backward != 0 applies the transpose (the gradient): x = dy, y = dx.
cudaError_t lh_launch_rope(int dtype, const void* x, void* y, const float* cos, const float* sin, int64_t B, int64_t H,
                           int64_t T, int64_t D, const int64_t* xs, const int64_t* ys, int64_t cs, int backward,
                           cudaStream_t stream);
