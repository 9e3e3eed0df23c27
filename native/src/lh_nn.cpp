// Neural-network functions, autograd and optimizer steps.
#include "lh_common.h"
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <cmath>

// ---- functional ----

LH_API TH lh_linear(TH x, TH w, TH b) {
  LH_TENSOR(b ? at::linear(*x, *w, *b) : at::linear(*x, *w))
}

LH_API TH lh_embedding(TH weight, TH indices, int64_t padding_idx) {
  LH_TENSOR(at::embedding(*weight, *indices, padding_idx))
}

LH_API TH lh_layer_norm(TH x, const int64_t* shape, int n, TH w, TH b, double eps) {
  LH_TRY
  c10::optional<at::Tensor> weight, bias;
  if (w) weight = *w;
  if (b) bias = *b;
  return lh::wrap(at::layer_norm(*x, lh::dims(shape, n), weight, bias, eps));
  LH_CATCH(nullptr)
}

// RMSNorm over the last dimension, computed in float32 and cast back (as transformers' LlamaRMSNorm does).
// The composite path; lh_fused_ops.cpp's lh_fused_rms_norm runs a CUDA kernel where it can and falls back to this.
namespace lh {
at::Tensor rms_norm_composite(const at::Tensor& x, const at::Tensor* w, double eps) {
  auto input_dtype = x.scalar_type();
  auto h = input_dtype == at::kDouble ? x : x.to(at::kFloat);
  auto normed = h * at::rsqrt(h.pow(2).mean(-1, true) + eps);
  auto out = normed.to(input_dtype);
  if (w) out = *w * out;
  return out;
}
}  // namespace lh

LH_API TH lh_rms_norm(TH x, TH w, double eps) { LH_TENSOR(lh::rms_norm_composite(*x, w, eps)) }

LH_API TH lh_softmax(TH x, int64_t dim, int dtype) {
  LH_TRY
  if (dtype >= 0) return lh::wrap(at::softmax(*x, dim, static_cast<at::ScalarType>(dtype)));
  return lh::wrap(at::softmax(*x, dim));
  LH_CATCH(nullptr)
}

LH_API TH lh_log_softmax(TH x, int64_t dim, int dtype) {
  LH_TRY
  if (dtype >= 0) return lh::wrap(at::log_softmax(*x, dim, static_cast<at::ScalarType>(dtype)));
  return lh::wrap(at::log_softmax(*x, dim));
  LH_CATCH(nullptr)
}

// reduction: 0 none, 1 mean, 2 sum (at::Reduction numbering)
LH_API TH lh_cross_entropy(TH logits, TH target, int64_t ignore_index, int reduction, double label_smoothing) {
  LH_TENSOR(at::cross_entropy_loss(*logits, *target, {}, reduction, ignore_index, label_smoothing))
}

LH_API TH lh_nll_loss(TH logp, TH target, int64_t ignore_index, int reduction) {
  LH_TENSOR(at::nll_loss(*logp, *target, {}, reduction, ignore_index))
}

LH_API TH lh_mse_loss(TH a, TH b, int reduction) { LH_TENSOR(at::mse_loss(*a, *b, reduction)) }

LH_API TH lh_dropout(TH x, double p, int train) { LH_TENSOR(at::dropout(*x, p, train != 0)) }

// Scaled dot-product attention over (batch, heads, seq, head_dim). Uses libtorch's fused kernels
// (flash / memory-efficient) on torch >= 2.0; older libtorch gets the explicit math.
LH_API TH lh_sdpa(TH q, TH k, TH v, TH mask, double dropout_p, int is_causal, double scale, int has_scale) {
  LH_TRY
  c10::optional<at::Tensor> m;
  if (mask) m = *mask;
#if TORCH_VERSION_MAJOR >= 2
  c10::optional<double> s;
  if (has_scale) s = scale;
  return lh::wrap(at::scaled_dot_product_attention(*q, *k, *v, m, dropout_p, is_causal != 0, s));
#else
  double sc = has_scale ? scale : 1.0 / std::sqrt(static_cast<double>(q->size(-1)));
  auto scores = at::matmul(*q, k->transpose(-2, -1)) * sc;
  if (is_causal) {
    auto L = q->size(-2), S = k->size(-2);
    auto causal = at::ones({L, S}, q->options().dtype(at::kBool)).tril(S - L);
    scores = scores.masked_fill(causal.logical_not(), -std::numeric_limits<float>::infinity());
  }
  if (m) {
    if (m->scalar_type() == at::kBool) scores = scores.masked_fill(m->logical_not(), -std::numeric_limits<float>::infinity());
    else scores = scores + *m;
  }
  auto attn = q->scalar_type() == at::kDouble ? at::softmax(scores, -1) : at::softmax(scores, -1, at::kFloat).to(q->scalar_type());
  if (dropout_p > 0) attn = at::dropout(attn, dropout_p, true);
  return lh::wrap(at::matmul(attn, *v));
#endif
  LH_CATCH(nullptr)
}

// SDPA with grouped-query attention: key/value may have fewer heads than query (heads % kv_heads == 0; kv head i
// serves query heads i·g … i·g+g−1). libtorch >= 2.5 takes them as they are (enable_gqa: the flash kernel reads each
// kv head once per group, no copy); older libtorch gets k/v expanded to the query's heads first.
LH_API TH lh_sdpa_gqa(TH q, TH k, TH v, TH mask, double dropout_p, int is_causal, double scale, int has_scale) {
  LH_TRY
  LH_REQUIRE(q->dim() >= 3 && k->dim() == q->dim() && v->dim() == q->dim(),
             "grouped-query attention expects query, key and value of shape (batch, heads, seq, head_dim)");
  const int64_t heads = q->size(-3), kv_heads = k->size(-3);
  LH_REQUIRE(kv_heads > 0 && v->size(-3) == kv_heads && heads % kv_heads == 0,
             "grouped-query attention needs key and value heads (" + std::to_string(kv_heads) + ", " +
                 std::to_string(v->size(-3)) + ") equal and dividing the query heads (" + std::to_string(heads) + ")");
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
  c10::optional<at::Tensor> m;
  if (mask) m = *mask;
  c10::optional<double> s;
  if (has_scale) s = scale;
  return lh::wrap(at::scaled_dot_product_attention(*q, *k, *v, m, dropout_p, is_causal != 0, s, heads != kv_heads));
#else
  if (heads == kv_heads) return lh_sdpa(q, k, v, mask, dropout_p, is_causal, scale, has_scale);
  auto expand = [&](const at::Tensor& t) {
    auto sizes = t.sizes().vec();
    auto grouped = sizes;
    grouped.insert(grouped.end() - 2, heads / kv_heads);  // (..., kv_heads, groups, seq, head_dim)
    auto e = t.unsqueeze(-3).expand(grouped);
    sizes[sizes.size() - 3] = heads;
    return e.reshape(sizes);
  };
  auto ke = expand(*k), ve = expand(*v);
  return lh_sdpa(q, &ke, &ve, mask, dropout_p, is_causal, scale, has_scale);
#endif
  LH_CATCH(nullptr)
}

// ---- autograd ----

LH_API int lh_requires_grad(TH t) { return t->requires_grad() ? 1 : 0; }
LH_API int lh_set_requires_grad(TH t, int value) { LH_STATUS(t->set_requires_grad(value != 0)) }
LH_API int lh_is_leaf(TH t) { return t->is_leaf() ? 1 : 0; }
LH_API int lh_retain_grad(TH t) { LH_STATUS(t->retain_grad()) }

// Writes a new handle to the gradient, or nullptr when there is none.
LH_API int lh_grad(TH t, TH* out) {
  LH_TRY
  const auto& g = t->grad();
  *out = g.defined() ? lh::wrap(g) : nullptr;
  return 0;
  LH_CATCH(-1)
}

LH_API int lh_set_grad(TH t, TH grad) {
  LH_TRY
  t->mutable_grad() = grad ? *grad : at::Tensor();
  return 0;
  LH_CATCH(-1)
}

LH_API int lh_backward(TH t, TH grad, int retain_graph) {
  LH_TRY
  at::Tensor g = grad ? *grad : at::Tensor();
  t->backward(g, retain_graph != 0);
  return 0;
  LH_CATCH(-1)
}

LH_API int lh_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }
LH_API void lh_set_grad_enabled(int enabled) { at::GradMode::set_enabled(enabled != 0); }

// ---- optimizers ----

static double bias_correction(double beta, int64_t step) { return 1.0 - std::pow(beta, static_cast<double>(step)); }

// One AdamW step over a parameter group. `steps` holds one float32 scalar tensor per parameter
// (PyTorch's `state["step"]`), on the parameter's device. Parameters without a gradient are skipped.
// On CUDA with torch >= 2.0 and use_fused set, this is libtorch's fused multi-tensor kernel.
LH_API int lh_adamw_step(TH* params, TH* exp_avgs, TH* exp_avg_sqs, TH* steps, int n, double lr, double beta1,
                         double beta2, double eps, double weight_decay, int use_fused) {
  LH_TRY
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> p, g, m, v, s;
  for (int i = 0; i < n; i++) {
    const auto& grad = params[i]->grad();
    if (!grad.defined()) continue;
    p.push_back(*params[i]);
    g.push_back(grad);
    m.push_back(*exp_avgs[i]);
    v.push_back(*exp_avg_sqs[i]);
    s.push_back(*steps[i]);
  }
  if (p.empty()) return 0;
#if TORCH_VERSION_MAJOR >= 2
  if (use_fused && p[0].is_cuda()) {
    // The fused kernel reads state_steps but does not advance them (PyTorch's optimizer adds 1 before the call).
    at::_foreach_add_(s, 1);
    std::vector<at::Tensor> none;
    at::_fused_adamw_(p, g, m, v, none, s, lr, beta1, beta2, weight_decay, eps, false, false, c10::nullopt, c10::nullopt);
    return 0;
  }
#endif
  for (size_t i = 0; i < p.size(); i++) {
    s[i].add_(1);
    int64_t step = static_cast<int64_t>(s[i].item<double>());
    double bc1 = bias_correction(beta1, step), bc2 = bias_correction(beta2, step);
    auto grad = g[i].to(m[i].scalar_type());
    if (weight_decay != 0) p[i].mul_(1.0 - lr * weight_decay);
    m[i].lerp_(grad, 1.0 - beta1);
    v[i].mul_(beta2).addcmul_(grad, grad, 1.0 - beta2);
    auto denom = (v[i].sqrt() / std::sqrt(bc2)).add_(eps);
    if (p[i].scalar_type() == m[i].scalar_type()) {
      p[i].addcdiv_(m[i], denom, -lr / bc1);
    } else {  // low-precision parameter with fp32 state: update in fp32, then round once
      auto p32 = p[i].to(m[i].scalar_type());
      p32.addcdiv_(m[i], denom, -lr / bc1);
      p[i].copy_(p32);
    }
  }
  return 0;
  LH_CATCH(-1)
}

// SGD with momentum (PyTorch semantics: buf = momentum*buf + grad; p -= lr*buf).
LH_API int lh_sgd_step(TH* params, TH* momentum_bufs, int n, double lr, double momentum, double weight_decay) {
  LH_TRY
  at::NoGradGuard no_grad;
  for (int i = 0; i < n; i++) {
    const auto& grad0 = params[i]->grad();
    if (!grad0.defined()) continue;
    auto grad = grad0;
    if (weight_decay != 0) grad = grad.add(*params[i], weight_decay);
    if (momentum != 0) {
      momentum_bufs[i]->mul_(momentum).add_(grad);
      grad = *momentum_bufs[i];
    }
    params[i]->sub_(grad, lr);
  }
  return 0;
  LH_CATCH(-1)
}

// Total 2-norm of the gradients; scales them so the norm is at most max_norm (when max_norm > 0).
LH_API int lh_clip_grad_norm(TH* params, int n, double max_norm, double* total_norm) {
  LH_TRY
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  for (int i = 0; i < n; i++) {
    const auto& g = params[i]->grad();
    if (g.defined()) grads.push_back(g);
  }
  if (grads.empty()) { *total_norm = 0; return 0; }
  std::vector<at::Tensor> norms;
  norms.reserve(grads.size());
  for (auto& g : grads) norms.push_back(at::linalg_vector_norm(g, 2.0, c10::nullopt, false, at::kFloat));
  auto total = at::linalg_vector_norm(at::stack(norms), 2.0);
  if (max_norm > 0) {
    auto coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
    for (auto& g : grads) g.mul_(coef.to(g.scalar_type()));
  }
  *total_norm = total.item<double>();
  return 0;
  LH_CATCH(-1)
}

// Replaces a tensor's data in place, keeping the handle and its autograd identity (PyTorch's `param.data = x`).
LH_API int lh_set_data(TH t, TH src) { LH_STATUS(t->set_data(*src)) }
