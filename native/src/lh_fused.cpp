// Fused training kernels built from libtorch ops with custom autograd functions.
#include "lh_common.h"
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

extern "C" void lh_tensor_free(TH t);

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// Logits are computed in fp32 (fp64 stays fp64, for gradient checks).
static at::ScalarType accumulate_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Next-token cross-entropy straight from hidden states: logits = hidden · weightᵀ are made one chunk of rows at a
// time, in fp32, and never kept; backward recomputes each chunk. Peak extra memory is one chunk of logits instead of
// the whole (tokens × vocab) fp32 matrix. Returns the mean loss over labels != ignore_index.
struct ChunkedCrossEntropy : public torch::autograd::Function<ChunkedCrossEntropy> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                            int64_t chunk, int64_t ignore_index) {
    at::NoGradGuard no_grad;
    auto n = hidden.size(0);
    auto acc = accumulate_type(hidden);
    auto count = labels.ne(ignore_index).sum().clamp_min(1).to(acc);
    auto total = at::zeros({}, hidden.options().dtype(acc));
    for (int64_t start = 0; start < n; start += chunk) {
      auto len = std::min(chunk, n - start);
      auto logits = at::matmul(hidden.narrow(0, start, len), weight.t()).to(acc);
      total += at::cross_entropy_loss(logits, labels.narrow(0, start, len), {}, at::Reduction::Sum, ignore_index);
    }
    ctx->save_for_backward({hidden, weight, labels, count});
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["ignore_index"] = ignore_index;
    return total / count;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    auto hidden = saved[0], weight = saved[1], labels = saved[2], count = saved[3];
    auto chunk = ctx->saved_data["chunk"].toInt();
    auto ignore_index = ctx->saved_data["ignore_index"].toInt();
    auto acc = accumulate_type(hidden);
    auto scale = grad_outputs[0].to(acc) / count;
    bool want_hidden = ctx->needs_input_grad(0), want_weight = ctx->needs_input_grad(1);
    at::Tensor grad_hidden = want_hidden ? at::empty_like(hidden) : at::Tensor();
    at::Tensor grad_weight = want_weight ? at::zeros(weight.sizes(), weight.options().dtype(acc)) : at::Tensor();
    auto n = hidden.size(0);
    for (int64_t start = 0; start < n; start += chunk) {
      auto len = std::min(chunk, n - start);
      auto h = hidden.narrow(0, start, len);
      auto y = labels.narrow(0, start, len);
      // d loss / d logits = softmax(logits) − onehot(label), zero on ignored rows, times the upstream scale.
      auto probs = at::softmax(at::matmul(h, weight.t()).to(acc), -1);
      auto valid = y.ne(ignore_index);
      auto safe = at::where(valid, y, at::zeros_like(y));
      probs.scatter_add_(1, safe.unsqueeze(1), at::full({len, 1}, -1.0, probs.options()));
      probs.mul_(valid.unsqueeze(1).to(acc) * scale);
      auto g = probs.to(hidden.scalar_type());
      if (want_hidden) grad_hidden.narrow(0, start, len).copy_(at::matmul(g, weight));
      // In the inputs' dtype (bf16 tensor cores on GPU), accumulated across chunks in fp32.
      if (want_weight) grad_weight.add_(at::matmul(g.t(), h));
    }
    if (want_weight) grad_weight = grad_weight.to(weight.scalar_type());
    return {grad_hidden, grad_weight, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

LH_API TH lh_chunked_cross_entropy(TH hidden, TH weight, TH labels, int64_t chunk, int64_t ignore_index) {
  LH_TRY
  LH_REQUIRE(hidden->dim() == 2 && weight->dim() == 2 && labels->dim() == 1, "chunked cross-entropy expects hidden (N, D), weight (V, D), labels (N)");
  LH_REQUIRE(hidden->size(0) == labels->size(0), "hidden and labels must have the same number of rows");
  LH_REQUIRE(hidden->size(1) == weight->size(1), "hidden size " + std::to_string(hidden->size(1)) + " does not match the head's " + std::to_string(weight->size(1)));
  LH_REQUIRE(chunk > 0, "chunk size must be positive");
  return lh::wrap(ChunkedCrossEntropy::apply(*hidden, *weight, *labels, chunk, ignore_index));
  LH_CATCH(nullptr)
}

// ---- activation checkpointing ----

// A .NET function y = f(x) run without keeping activations: forward runs it under no_grad, backward re-runs it
// with grad enabled (restoring the RNG state so dropout masks repeat) and back-propagates through the recomputation.
typedef TH (*lh_checkpoint_fn)(int64_t id, TH input, int release);

struct Checkpoint : public torch::autograd::Function<Checkpoint> {
  static at::Tensor call(lh_checkpoint_fn fn, int64_t id, const at::Tensor& x, bool release) {
    TH result = fn(id, lh::wrap(x), release ? 1 : 0);
    if (!result) throw std::runtime_error("the checkpointed .NET function failed (see the inner exception)");
    at::Tensor out = *result;
    lh_tensor_free(result);
    return out;
  }

  static at::Generator generator_for(const at::Tensor& x) {
    return x.is_cuda() ? at::globalContext().defaultGenerator(x.device()) : at::detail::getDefaultCPUGenerator();
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t fn, int64_t id) {
    auto gen = generator_for(x);
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      ctx->saved_data["rng"] = gen.get_state();
    }
    ctx->saved_data["fn"] = fn;
    ctx->saved_data["id"] = id;
    ctx->save_for_backward({x});
    at::NoGradGuard no_grad;
    return call(reinterpret_cast<lh_checkpoint_fn>(fn), id, x, false);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grad_outputs) {
    auto x = ctx->get_saved_variables()[0];
    auto fn = reinterpret_cast<lh_checkpoint_fn>(ctx->saved_data["fn"].toInt());
    auto id = ctx->saved_data["id"].toInt();
    auto gen = generator_for(x);
    at::Tensor current;
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      current = gen.get_state();
      gen.set_state(ctx->saved_data["rng"].toTensor());
    }
    auto input = x.detach().requires_grad_(true);
    at::Tensor out;
    {
      at::AutoGradMode enable(true);
      out = call(fn, id, input, true);
    }
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(current);
    }
    torch::autograd::backward({out}, {grad_outputs[0]});
    return {input.grad(), at::Tensor(), at::Tensor()};
  }
};

LH_API TH lh_checkpoint(TH x, lh_checkpoint_fn fn, int64_t id) {
  LH_TRY
  // The input must require grad, or autograd would never call backward and parameters inside f get no gradient.
  at::Tensor input = x->requires_grad() ? *x : x->detach().requires_grad_(true);
  return lh::wrap(Checkpoint::apply(input, reinterpret_cast<int64_t>(fn), id));
  LH_CATCH(nullptr)
}
