// Fused Llama-block ops: RMSNorm, SwiGLU and rotary embeddings as custom autograd functions over the CUDA kernels of
// src/cuda/lh_fused_kernels.cu. Each entry point takes `fused`: 0 runs the composite libtorch ops (portable, and the
// reference the tests compare against); 1 runs the kernels where they apply (a CUDA build, a CUDA tensor of fp32, fp16
// or bf16, supported shapes) and the composite ops otherwise. Inputs are validated identically on both paths.
#include "lh_common.h"
#include <torch/csrc/autograd/custom_function.h>
#include <atomic>
#ifdef LH_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/lh_kernels_fused.h"
#endif

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

namespace lh {
at::Tensor rms_norm_composite(const at::Tensor& x, const at::Tensor* w, double eps);  // lh_nn.cpp
}

namespace {

// Kernel launches so far (all fused ops, forward and backward): lets tests prove the fused path really ran.
std::atomic<int64_t> launches{0};

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); i++) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

at::Tensor swiglu_composite(const at::Tensor& g, const at::Tensor& u) { return at::silu(g) * u; }

at::Tensor rope_composite(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  auto half = x.size(-1) / 2;
  auto rotated = at::cat({x.narrow(-1, half, half).neg(), x.narrow(-1, 0, half)}, -1);
  return x * cos.to(x.scalar_type()) + rotated * sin.to(x.scalar_type());
}

#ifdef LH_WITH_CUDA
bool kernel_dtype(const at::Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return LH_FUSED_F32;
    case at::kHalf: return LH_FUSED_F16;
    case at::kBFloat16: return LH_FUSED_BF16;
    default: throw std::invalid_argument("fused kernels take float32, float16 or bfloat16 tensors");
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + " kernel failed: " + cudaGetErrorString(e));
  launches.fetch_add(1, std::memory_order_relaxed);
}

// ---- RMSNorm ----

struct FusedRMSNorm : public torch::autograd::Function<FusedRMSNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight, double eps) {
    at::NoGradGuard no_grad;
    c10::cuda::CUDAGuard guard(input.device());
    auto x = input.contiguous();
    auto w = weight.contiguous();
    const int64_t cols = x.size(-1);
    const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
    auto y = at::empty_like(x);
    auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
    check(lh_launch_rms_norm_forward(dtype_code(x), x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), rows,
                                     cols, static_cast<float>(eps), at::cuda::getCurrentCUDAStream()),
          "rms_norm forward");
    ctx->save_for_backward({x, w, rstd});
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    auto x = saved[0], w = saved[1], rstd = saved[2];
    c10::cuda::CUDAGuard guard(x.device());
    auto dy = grad_outputs[0].to(x.scalar_type()).contiguous();
    const int64_t cols = x.size(-1);
    const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
    const bool want_w = ctx->needs_input_grad(1);
    auto stream = at::cuda::getCurrentCUDAStream();
    auto dx = at::empty_like(x);
    at::Tensor dw, partial;
    int blocks;
    if (want_w) {
      // Per-block dw partials, then a column reduce: a few blocks per multiprocessor keep the loads in flight.
      const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 4 * sms)));
      partial = at::empty({blocks, cols}, x.options().dtype(at::kFloat));
    } else {
      blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 1 << 30)));
    }
    check(lh_launch_rms_norm_backward(dtype_code(x), dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr<float>(),
                                      dx.data_ptr(), want_w ? partial.data_ptr<float>() : nullptr, blocks, rows, cols, stream),
          "rms_norm backward");
    if (want_w) {
      dw = at::empty_like(w);
      check(lh_launch_rms_norm_dw_reduce(dtype_code(w), partial.data_ptr<float>(), blocks, dw.data_ptr(), cols, stream),
            "rms_norm weight-gradient");
    }
    return {dx, dw, at::Tensor()};
  }
};

// ---- SwiGLU ----

struct FusedSwiGLU : public torch::autograd::Function<FusedSwiGLU> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    at::NoGradGuard no_grad;
    c10::cuda::CUDAGuard guard(gate.device());
    auto g = gate.contiguous();
    auto u = up.contiguous();
    auto y = at::empty_like(g);
    check(lh_launch_swiglu_forward(dtype_code(g), g.data_ptr(), u.data_ptr(), y.data_ptr(), g.numel(),
                                   at::cuda::getCurrentCUDAStream()),
          "swiglu forward");
    ctx->save_for_backward({g, u});
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    auto g = saved[0], u = saved[1];
    c10::cuda::CUDAGuard guard(g.device());
    auto dy = grad_outputs[0].to(g.scalar_type()).contiguous();
    auto dg = at::empty_like(g);
    auto du = at::empty_like(u);
    check(lh_launch_swiglu_backward(dtype_code(g), dy.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(),
                                    g.numel(), at::cuda::getCurrentCUDAStream()),
          "swiglu backward");
    return {ctx->needs_input_grad(0) ? dg : at::Tensor(), ctx->needs_input_grad(1) ? du : at::Tensor()};
  }
};

// ---- rotary embedding ----

// x (B, H, T, D) with unit stride along D, any other strides (q and k arrive as transposed views of the projections);
// the output keeps x's layout.
void launch_rope(const at::Tensor& x, const at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const int64_t xs[3] = {x.stride(0), x.stride(1), x.stride(2)};
  const int64_t ys[3] = {y.stride(0), y.stride(1), y.stride(2)};
  check(lh_launch_rope(dtype_code(x), x.data_ptr(), y.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(), x.size(0),
                       x.size(1), x.size(2), x.size(3), xs, ys, cos.stride(0), backward ? 1 : 0,
                       at::cuda::getCurrentCUDAStream()),
        backward ? "rope backward" : "rope forward");
}

at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// A tensor whose strides the kernel can write through: x's own layout when it is dense, else contiguous.
at::Tensor output_like(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) return at::empty_like(t);
  return at::empty(t.sizes(), t.options());
}

struct FusedRope : public torch::autograd::Function<FusedRope> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& cos, const at::Tensor& sin) {
    at::NoGradGuard no_grad;
    c10::cuda::CUDAGuard guard(input.device());
    auto x = unit_last_stride(input);
    auto y = output_like(x);
    launch_rope(x, y, cos, sin, false);
    ctx->save_for_backward({cos, sin});
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    auto cos = saved[0], sin = saved[1];
    auto dy = unit_last_stride(grad_outputs[0]);
    c10::cuda::CUDAGuard guard(dy.device());
    auto dx = output_like(dy);
    launch_rope(dy, dx, cos, sin, true);
    return {dx, at::Tensor(), at::Tensor()};
  }
};


bool use_kernels(int fused, const at::Tensor& t) { return fused != 0 && t.is_cuda() && kernel_dtype(t); }
#endif

}  // namespace

LH_API int lh_fused_kernels_available() {
#ifdef LH_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

LH_API int64_t lh_fused_launch_count() { return launches.load(std::memory_order_relaxed); }

// y = w · cast(x · rsqrt(mean(x²) + eps)) over the last dimension (transformers' LlamaRMSNorm). w may be null.
LH_API TH lh_fused_rms_norm(TH x, TH w, double eps, int fused) {
  LH_TRY
  LH_REQUIRE(x->dim() >= 1, "rms_norm expects an input with at least one dimension");
  if (w) {
    LH_REQUIRE(w->dim() == 1 && w->size(0) == x->size(-1),
               "rms_norm weight of shape " + shape_of(*w) + " does not match the input's last dimension (input " + shape_of(*x) + ")");
    LH_REQUIRE(w->device() == x->device(), "rms_norm input and weight are on different devices");
  }
#ifdef LH_WITH_CUDA
  if (w && use_kernels(fused, *x) && w->scalar_type() == x->scalar_type() && x->size(-1) > 0 &&
      x->size(-1) <= LH_RMS_NORM_MAX_COLS)
    return lh::wrap(FusedRMSNorm::apply(*x, *w, eps));
#endif
  return lh::wrap(lh::rms_norm_composite(*x, w, eps));
  LH_CATCH(nullptr)
}

// silu(gate) · up (the SwiGLU of Llama's MLP).
LH_API TH lh_fused_swiglu(TH gate, TH up, int fused) {
  LH_TRY
  LH_REQUIRE(gate->sizes() == up->sizes(), "swiglu gate " + shape_of(*gate) + " and up " + shape_of(*up) + " differ in shape");
  LH_REQUIRE(gate->device() == up->device(), "swiglu gate and up are on different devices");
  LH_REQUIRE(gate->scalar_type() == up->scalar_type(), "swiglu gate and up differ in dtype");
#ifdef LH_WITH_CUDA
  if (use_kernels(fused, *gate)) return lh::wrap(FusedSwiGLU::apply(*gate, *up));
#endif
  return lh::wrap(swiglu_composite(*gate, *up));
  LH_CATCH(nullptr)
}

// x·cos + rotate_half(x)·sin for x (batch, heads, seq, head_dim) and fp32 tables cos, sin (seq, head_dim).
LH_API TH lh_fused_rope(TH x, TH cos, TH sin, int fused) {
  LH_TRY
  LH_REQUIRE(x->dim() == 4, "rotary embedding expects x of shape (batch, heads, seq, head_dim), got " + shape_of(*x));
  LH_REQUIRE(x->size(3) % 2 == 0, "rotary embedding needs an even head_dim, got " + std::to_string(x->size(3)));
  for (auto* t : {cos, sin})
    LH_REQUIRE(t->dim() == 2 && t->size(0) == x->size(2) && t->size(1) == x->size(3),
               "rotary tables must be (seq, head_dim) = (" + std::to_string(x->size(2)) + ", " + std::to_string(x->size(3)) +
                   "), got " + shape_of(*t));
  LH_REQUIRE(cos->device() == x->device() && sin->device() == x->device(), "rotary tables and x are on different devices");
#ifdef LH_WITH_CUDA
  if (use_kernels(fused, *x) && cos->scalar_type() == at::kFloat && sin->scalar_type() == at::kFloat) {
    auto c = cos->contiguous(), s = sin->contiguous();
    return lh::wrap(FusedRope::apply(*x, c, s));
  }
#endif
  return lh::wrap(rope_composite(*x, *cos, *sin));
  LH_CATCH(nullptr)
}
