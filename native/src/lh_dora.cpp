// DoRA (plugins/DoRA) in the shim: the per-row weight norm ‖W0 + s·B·A‖ in one call (the factored form of
// DoraWeightNorm.Factored, without weight-sized temporaries), and the DoRA output y = t + (m/‖V‖ − 1)·(t − bias) as a
// custom autograd function over the CUDA kernels of src/cuda/lh_dora_kernels.cu. As in lh_fused_ops.cpp, `fused` = 0
// runs the composite libtorch ops (portable, and the reference the tests compare against); 1 runs the kernels where
// they apply (a CUDA build, a CUDA t of fp32/fp16/bf16 with at least one element, no trainable bias) and the composite
// ops otherwise. Inputs are validated identically on both paths.
#include "lh_common.h"
#include <torch/csrc/autograd/custom_function.h>
#include <atomic>
#ifdef LH_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/lh_kernels_dora.h"
#include "cuda/lh_kernels_fused.h"
#endif

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

namespace {

// DoRA kernel launches so far (forward, backward and reduce): lets tests prove the fused path really ran.
std::atomic<int64_t> dora_launches{0};

std::string dims_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); i++) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// The plugin's former C# ops, one for one: the correction cast to t's dtype, y = t + t·c, minus bias·c.
at::Tensor dora_output_composite(const at::Tensor& t, const at::Tensor& c, const at::Tensor* bias) {
  auto corr = c.scalar_type() == t.scalar_type() ? c : c.to(t.scalar_type());
  auto y = t.addcmul(t, corr);
  if (bias) y = y.sub(bias->to(t.scalar_type()).mul(corr));
  return y;
}

#ifdef LH_WITH_CUDA
int dora_dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return LH_FUSED_F32;
    case at::kHalf: return LH_FUSED_F16;
    case at::kBFloat16: return LH_FUSED_BF16;
    default: throw std::invalid_argument("fused DoRA kernels take float32, float16 or bfloat16 tensors");
  }
}

void dora_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + " kernel failed: " + cudaGetErrorString(e));
  dora_launches.fetch_add(1, std::memory_order_relaxed);
}

// Blocks down the rows: about 8 blocks of 256 threads per multiprocessor over all column tiles.
int dora_row_blocks(int64_t rows, int64_t cols) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles = std::max<int64_t>(1, (cols + 255) / 256);
  int64_t by = std::min<int64_t>((rows + 7) / 8, std::max<int64_t>(1, 8 * sms / tiles));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(by, 65535)));
}

struct FusedDoraOutput : public torch::autograd::Function<FusedDoraOutput> {
  // t (…, cols), c (cols) any float dtype (used in fp32), bias (cols, frozen: no gradient) or an empty tensor for none
  // (an undefined tensor cannot be an input of a custom function).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& t, const at::Tensor& c, const at::Tensor& bias) {
    at::NoGradGuard no_grad;
    c10::cuda::CUDAGuard guard(t.device());
    auto x = t.contiguous();
    auto c32 = c.to(at::kFloat).contiguous();
    at::Tensor b;
    if (bias.numel() > 0) b = bias.to(x.scalar_type()).contiguous();
    auto y = at::empty(x.sizes(), x.options());
    const int64_t cols = x.size(-1);
    const int64_t rows = x.numel() / cols;
    dora_check(lh_launch_dora_forward(dora_dtype_code(x), x.data_ptr(), c32.data_ptr<float>(),
                                      b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), rows, cols,
                                      dora_row_blocks(rows, cols), at::cuda::getCurrentCUDAStream()),
               "dora forward");
    // y, not t: backward recovers t − b = (y − b)/(1 + c), so t (an output-sized activation) is not kept alive here.
    ctx->save_for_backward({y, c32, b.defined() ? b : at::empty({0}, x.options())});
    ctx->saved_data["c_dtype"] = static_cast<int64_t>(c.scalar_type());
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    auto y = saved[0], c32 = saved[1], b = saved[2];
    c10::cuda::CUDAGuard guard(y.device());
    auto g = grad_outputs[0].to(y.scalar_type()).contiguous();
    const int64_t cols = y.size(-1);
    const int64_t rows = y.numel() / cols;
    const int blocks = dora_row_blocks(rows, cols);
    auto stream = at::cuda::getCurrentCUDAStream();
    auto gt = at::empty(y.sizes(), y.options());
    auto partial = at::empty({blocks, cols}, y.options().dtype(at::kFloat));
    auto gc = at::empty({cols}, y.options().dtype(at::kFloat));
    dora_check(lh_launch_dora_backward(dora_dtype_code(y), g.data_ptr(), y.data_ptr(), c32.data_ptr<float>(),
                                       b.numel() > 0 ? b.data_ptr() : nullptr, gt.data_ptr(), partial.data_ptr<float>(), rows,
                                       cols, blocks, stream),
               "dora backward");
    dora_check(lh_launch_dora_grad_c_reduce(partial.data_ptr<float>(), blocks, c32.data_ptr<float>(), gc.data_ptr<float>(),
                                            cols, stream),
               "dora correction-gradient");
    const auto c_dtype = static_cast<at::ScalarType>(ctx->saved_data["c_dtype"].toInt());
    return {ctx->needs_input_grad(0) ? gt : at::Tensor(), ctx->needs_input_grad(1) ? gc.to(c_dtype) : at::Tensor(),
            at::Tensor()};
  }
};

bool dora_kernel_dtype(const at::Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}
#endif

}  // namespace

LH_API int64_t lh_dora_launch_count() { return dora_launches.load(std::memory_order_relaxed); }

// y = t + c·(t − bias) with c = m/norm − 1 formed in m's dtype (fp32 for fp32 magnitudes; autograd sees m, and norm
// unless the caller detached it). t: (…, out); m, norm, bias: (out); bias may be null.
LH_API TH lh_dora_output(TH t, TH m, TH norm, TH bias, int fused) {
  LH_TRY
  LH_REQUIRE(t->dim() >= 1, "dora_output expects t with at least one dimension");
  const int64_t cols = t->size(-1);
  for (auto* v : {m, norm, bias}) {
    if (!v) continue;
    LH_REQUIRE(v->dim() == 1 && v->size(0) == cols,
               "dora_output: vector of shape " + dims_of(*v) + " does not match t's last dimension (t " + dims_of(*t) + ")");
    LH_REQUIRE(v->device() == t->device(), "dora_output: t and its vectors are on different devices");
  }
  LH_REQUIRE(m && norm, "dora_output needs the magnitude and the norm");
  auto c = m->div(*norm).sub(1.0);
#ifdef LH_WITH_CUDA
  const bool bias_trains = bias && bias->requires_grad() && at::GradMode::is_enabled();
  if (fused != 0 && t->is_cuda() && dora_kernel_dtype(*t) && t->numel() > 0 && at::isFloatingType(c.scalar_type()) &&
      !bias_trains)
    return lh::wrap(FusedDoraOutput::apply(*t, c, bias ? *bias : at::empty({0}, t->options())));
#endif
  return lh::wrap(dora_output_composite(*t, c, bias));
  LH_CATCH(nullptr)
}

// ‖W0 + s·B·A‖ per row (W0: out×in, A: r×in, B: out×r) from base_norms_sq = ‖W0_i‖² (in the accumulation dtype,
// which the result has): ‖W0_i‖² + row sums of B ⊙ (2s·W0·Aᵀ + s²·B·(A·Aᵀ)), clamped at 0 before the square root.
// W0·Aᵀ runs in W0's dtype (one pass over W0, fp32 accumulation inside the GEMM); the rest in the accumulation dtype.
// Differentiable in A and B under grad mode (the caller decides).
LH_API TH lh_dora_weight_norm(TH w0, TH base_norms_sq, TH a, TH b, double scaling) {
  LH_TRY
  LH_REQUIRE(w0->dim() == 2 && a->dim() == 2 && b->dim() == 2 && base_norms_sq->dim() == 1,
             "dora_weight_norm expects W0 (out, in), A (r, in), B (out, r) and base norms (out)");
  LH_REQUIRE(a->size(1) == w0->size(1) && b->size(0) == w0->size(0) && b->size(1) == a->size(0) &&
                 base_norms_sq->size(0) == w0->size(0),
             "dora_weight_norm: shapes do not fit: W0 " + dims_of(*w0) + ", A " + dims_of(*a) + ", B " + dims_of(*b) +
                 ", base norms " + dims_of(*base_norms_sq));
  const auto acc = base_norms_sq->scalar_type();
  auto aw = a->scalar_type() == w0->scalar_type() ? *a : a->to(w0->scalar_type());
  auto w0_at = w0->matmul(aw.t());
  if (w0_at.scalar_type() != acc) w0_at = w0_at.to(acc);
  auto a32 = a->scalar_type() == acc ? *a : a->to(acc);
  auto b32 = b->scalar_type() == acc ? *b : b->to(acc);
  auto inner = w0_at.addmm(b32, a32.matmul(a32.t()), 2 * scaling, scaling * scaling);
  auto squared = base_norms_sq->add(inner.mul(b32).sum(1));
  return lh::wrap(squared.clamp_min(0).sqrt());
  LH_CATCH(nullptr)
}
