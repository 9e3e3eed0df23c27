// lh_lowrank_epilogue.cuh: a LoRA projection's low-rank update and DoRA row scale applied per element after its frozen
// base product y_base = x·Wᵀ came from a GEMM: out = c ⊙ (y_base + s·xa·Bᵀ) with xa = x·Aᵀ (tokens × r), B (n × r) and c
// per output column (1 for LoRA), in fp32 with one rounding by the caller (the composite path rounds after the addmm and
// again after the scale). Included as "lh_lowrank_epilogue.cuh" after "lh_common.cuh". Ranks up to LH_LR_MAX_RANK, any
// r (ranks past r are zeros in the tiles below); the dot runs in rank order, so the same inputs give the same bits in
// forward and in a backward that recomputes inner (DoRA's dc = Σ_tokens d(pre) ⊙ inner).
#pragma once

#define LH_LR_CHUNK 8      // ranks per register chunk of B
#define LH_LR_MAX_RANK 64  // largest rank: a token's xa row in shared memory is at most 64 floats

// Ranks rounded up to whole chunks (the stride of a staged xa tile's rows).
__device__ __forceinline__ int lowrank_padded(int rank) { return (rank + LH_LR_CHUNK - 1) / LH_LR_CHUNK * LH_LR_CHUNK; }

// Stages xa rows [row0, row0 + rows) (columns col0 .. col0 + rank − 1 of a row-major tokens × ld matrix of T) into the
// fp32 shared tile `tile` (rows × lowrank_padded(rank)); zeros past the rank and past total_rows. Every thread of the
// block calls it; the caller syncs (__syncthreads) before reading the tile.
template <typename T>
__device__ __forceinline__ void lowrank_stage_xa(const T* __restrict__ xa, i64 ld, i64 col0, i64 row0, int rows,
                                                 i64 total_rows, int rank, float* tile) {
  const int pad = lowrank_padded(rank);
  const int threads = blockDim.x * blockDim.y * blockDim.z;
  const int tid = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  for (int i = tid; i < rows * pad; i += threads) {
    const int r = i / pad, k = i - r * pad;
    const i64 row = row0 + r;
    tile[i] = k < rank && row < total_rows ? Cvt<T>::to(xa[row * ld + col0 + k]) : 0.f;
  }
}

// Ranks k0 .. k0 + LH_LR_CHUNK − 1 of B's row n (B: n × r of T at row stride ldb, unit column stride) in fp32; 0 past
// the rank.
template <typename T>
__device__ __forceinline__ void lowrank_b_chunk(const T* __restrict__ b, i64 ldb, i64 n, int k0, int rank,
                                                float (&v)[LH_LR_CHUNK]) {
  const T* row = b + n * ldb + k0;
#pragma unroll
  for (int k = 0; k < LH_LR_CHUNK; k++) v[k] = k0 + k < rank ? Cvt<T>::to(row[k]) : 0.f;
}

// lowrank_b_chunk for a whole chunk (k0 + LH_LR_CHUNK <= rank) of a row at an address aligned to LH_LR_CHUNK elements
// (B contiguous with r a multiple of 8, 16- or 32-byte aligned): one 16-byte load (two for fp32) instead of 8.
template <typename T>
__device__ __forceinline__ void lowrank_b_chunk_aligned(const T* __restrict__ b, i64 ldb, i64 n, int k0,
                                                        float (&v)[LH_LR_CHUNK]) {
  const Pack<T, LH_LR_CHUNK> p = *reinterpret_cast<const Pack<T, LH_LR_CHUNK>*>(b + n * ldb + k0);
#pragma unroll
  for (int k = 0; k < LH_LR_CHUNK; k++) v[k] = Cvt<T>::to(p.v[k]);
}

// acc + Σ_k xa[k]·b[k] over one chunk (xa: a staged tile row at the chunk's first rank), in rank order.
__device__ __forceinline__ float lowrank_dot_chunk(const float* xa, const float (&b)[LH_LR_CHUNK], float acc) {
#pragma unroll
  for (int k = 0; k < LH_LR_CHUNK; k++) acc = fmaf(xa[k], b[k], acc);
  return acc;
}

// Σ_k xa[k]·B[n, k] over the whole rank (xa: a staged tile row), for callers that do not keep B in registers.
template <typename T>
__device__ __forceinline__ float lowrank_dot(const float* xa, const T* __restrict__ b, i64 ldb, i64 n, int rank) {
  float acc = 0.f;
  for (int k0 = 0; k0 < rank; k0 += LH_LR_CHUNK) {
    float bv[LH_LR_CHUNK];
    lowrank_b_chunk<T>(b, ldb, n, k0, rank, bv);
    acc = lowrank_dot_chunk(xa + k0, bv, acc);
  }
  return acc;
}

// inner = y_base + s·dot (the unscaled output: what c's gradient multiplies), fp32.
__device__ __forceinline__ float lowrank_inner(float base, float dot, float s) { return fmaf(s, dot, base); }

// The epilogue's value c·(y_base + s·dot) in fp32 (c = 1.f without a row scale); the caller rounds it once.
__device__ __forceinline__ float lowrank_epilogue(float base, float dot, float s, float c) {
  return c * lowrank_inner(base, dot, s);
}
