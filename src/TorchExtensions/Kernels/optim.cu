// Multi-tensor optimizer kernels: one launch updates every trainable tensor (AdamW), or reduces / scales every gradient
// (clip_grad_norm_). The tensors are described by a table in device memory, written by the C# side each step:
//
//   record t (10 × i64):  0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq (pointers; state may be CUDA managed memory),
//                         4 numel, 5 element types (param | grad << 8 | state << 16, LH_F32/LH_F16/LH_BF16),
//                         6 lr, 7 weight_decay, 8 bias_correction1, 9 sqrt(bias_correction2) (doubles, as bits)
//   then one i64 per block: tensor index << 32 | chunk index (chunks of `chunk` elements).
//
// AdamW follows torch.optim.AdamW (decoupled weight decay) in the order of the composite C# path, in fp32 registers,
// rounding once when storing: p ← p·(1 − lr·wd); m ← m·β1 + (1 − β1)·g; v ← v·β2 + (1 − β2)·g·g;
// p ← p − (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps).
#include "lh_common.cuh"

#define LH_RECORD 10

__device__ __forceinline__ double word_as_double(i64 w) { return __longlong_as_double(w); }

// w1 = 1 − β1 and w2 = 1 − β2 are formed in double on the host, as the composite path's scalars are.
extern "C" __global__ void lh_adamw(const i64* __restrict__ table, int tensors, i64 chunk, float beta1, float w1, float beta2,
                                    float w2, float eps) { lh_grid_dependency_sync();
  const i64 entry = table[static_cast<i64>(tensors) * LH_RECORD + blockIdx.x];
  const i64* r = table + (entry >> 32) * LH_RECORD;
  const i64 start = (entry & 0xffffffffLL) * chunk;
  const i64 numel = r[4];
  const i64 end = start + chunk < numel ? start + chunk : numel;
  void* p = reinterpret_cast<void*>(r[0]);
  const void* g = reinterpret_cast<const void*>(r[1]);
  void* m = reinterpret_cast<void*>(r[2]);
  void* v = reinterpret_cast<void*>(r[3]);
  const int pt = static_cast<int>(r[5] & 0xff), gt = static_cast<int>((r[5] >> 8) & 0xff), st = static_cast<int>((r[5] >> 16) & 0xff);
  const double lr = word_as_double(r[6]), wd = word_as_double(r[7]);
  const double bc1 = word_as_double(r[8]), bc2_sqrt = word_as_double(r[9]);
  const float decay = static_cast<float>(1.0 - lr * wd);
  const float step_size = static_cast<float>(-lr / bc1);
  const float bc2s = static_cast<float>(bc2_sqrt);
  for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float grad = load_any(g, i, gt);
    float param = load_any(p, i, pt);
    if (wd != 0.0) param = param * decay;
    const float mi = load_any(m, i, st) * beta1 + w1 * grad;
    const float vi = load_any(v, i, st) * beta2 + w2 * grad * grad;
    const float denom = sqrtf(vi) / bc2s + eps;
    param = param + step_size * mi / denom;
    store_any(m, i, st, mi);
    store_any(v, i, st, vi);
    store_any(p, i, pt, param);
  }
}

// partial[block] = Σ grad² over the block's chunk (fp32).
extern "C" __global__ void lh_grad_sumsq(const i64* __restrict__ table, int tensors, i64 chunk, float* __restrict__ partial) { lh_grid_dependency_sync();
  __shared__ float red[32];
  const i64 entry = table[static_cast<i64>(tensors) * LH_RECORD + blockIdx.x];
  const i64* r = table + (entry >> 32) * LH_RECORD;
  const i64 start = (entry & 0xffffffffLL) * chunk;
  const i64 numel = r[4];
  const i64 end = start + chunk < numel ? start + chunk : numel;
  const void* g = reinterpret_cast<const void*>(r[1]);
  const int gt = static_cast<int>((r[5] >> 8) & 0xff);
  float s = 0.f;
  for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float x = load_any(g, i, gt);
    s += x * x;
  }
  s = block_sum(s, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// grad ← grad · coef for every gradient in the table.
extern "C" __global__ void lh_grad_scale(const i64* __restrict__ table, int tensors, i64 chunk, float coef) { lh_grid_dependency_sync();
  const i64 entry = table[static_cast<i64>(tensors) * LH_RECORD + blockIdx.x];
  const i64* r = table + (entry >> 32) * LH_RECORD;
  const i64 start = (entry & 0xffffffffLL) * chunk;
  const i64 numel = r[4];
  const i64 end = start + chunk < numel ? start + chunk : numel;
  void* g = reinterpret_cast<void*>(r[1]);
  const int gt = static_cast<int>((r[5] >> 8) & 0xff);
  for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) store_any(g, i, gt, load_any(g, i, gt) * coef);
}
