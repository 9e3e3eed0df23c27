// lh_lowrank_epilogue.cuh: a LoRA projection's low-rank update and DoRA row scale applied per element after its frozen
// base product y_base = x·Wᵀ came from a GEMM: out = c ⊙ (y_base + s·dot), dot being the element's Σ_k xa·B (xa = x·Aᵀ,
// tokens × r; B, n × r) as the caller formed it, and c per output column (1 for LoRA), in fp32 with one rounding by the
// caller (the composite path rounds after the addmm and again after the scale). Included as "lh_lowrank_epilogue.cuh"
// after "lh_common.cuh".
#pragma once

// inner = y_base + s·dot (the unscaled output: what c's gradient multiplies), fp32.
__device__ __forceinline__ float lowrank_inner(float base, float dot, float s) { return fmaf(s, dot, base); }

// The epilogue's value c·(y_base + s·dot) in fp32 (c = 1.f without a row scale); the caller rounds it once.
__device__ __forceinline__ float lowrank_epilogue(float base, float dot, float s, float c) {
  return c * lowrank_inner(base, dot, s);
}
