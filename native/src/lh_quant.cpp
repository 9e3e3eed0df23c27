// Blockwise codebook quantization (QLoRA's NF4/FP4 and the 8-bit dynamic code for double quantization), the 4-bit
// dequantization (a CUDA kernel on GPU when the shim is built with CUDA, libtorch ops otherwise) and Linear4bit's
// forward/backward as a custom autograd function that never keeps a dequantized weight alive.
#include "lh_common.h"
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#ifdef LH_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/lh_kernels_quant.h"
#endif

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

static at::ScalarType index_type() {
#if TORCH_VERSION_MAJOR >= 2
  return at::kInt;
#else
  return at::kLong;
#endif
}

// x: any shape; code: sorted float32 codebook (16 or 256 values). Each block of `blocksize` values is scaled by its
// absolute maximum and every value replaced by the index of the nearest code value. 4-bit indices are packed two
// per byte, first value in the high nibble (bitsandbytes' order). Returns packed/indices (uint8) and absmax (fp32).
LH_API int lh_quantize_blockwise(TH x, TH code, int64_t blocksize, int bits, TH* out_q, TH* out_absmax) {
  LH_TRY
  LH_REQUIRE(bits == 4 || bits == 8, "bits must be 4 or 8");
  LH_REQUIRE(blocksize > 0 && blocksize % 2 == 0, "blocksize must be a positive even number");
  LH_REQUIRE(x->is_floating_point(), "only floating-point tensors can be quantized");
  LH_REQUIRE(code->numel() == (int64_t{1} << bits), "the codebook must have 2^bits values");
  at::NoGradGuard no_grad;
  auto flat = x->detach().reshape({-1}).to(at::kFloat);
  int64_t n = flat.numel();
  LH_REQUIRE(n > 0, "cannot quantize an empty tensor");
  int64_t blocks = (n + blocksize - 1) / blocksize;
  if (blocks * blocksize != n) flat = at::constant_pad_nd(flat, {0, blocks * blocksize - n}, 0);
  auto view = flat.view({blocks, blocksize});
  auto absmax = view.abs().amax(1);
  auto scale = at::where(absmax > 0, absmax, at::ones_like(absmax));
  auto normed = view / scale.unsqueeze(1);
  flat = at::Tensor();
  auto c = code->to(view.device(), at::kFloat);
  auto midpoints = (c.narrow(0, 1, c.numel() - 1) + c.narrow(0, 0, c.numel() - 1)) / 2;
  auto idx = at::bucketize(normed, midpoints).to(at::kByte).view({-1});
  if (bits == 4) {
    auto pairs = idx.view({-1, 2});
    idx = pairs.select(1, 0).bitwise_left_shift(4).bitwise_or(pairs.select(1, 1));
  }
  *out_q = lh::wrap(idx);
  *out_absmax = lh::wrap(absmax);
  return 0;
  LH_CATCH(-1)
}

// The inverse: code[index] × absmax of its block, first `numel` values, cast to dtype.
LH_API TH lh_dequantize_blockwise(TH q, TH absmax, TH code, int64_t blocksize, int bits, int64_t numel, int dtype) {
  LH_TRY
  LH_REQUIRE(bits == 4 || bits == 8, "bits must be 4 or 8");
  LH_REQUIRE(q->scalar_type() == at::kByte, "quantized values must be uint8");
  LH_REQUIRE(blocksize > 0 && absmax->numel() * blocksize == q->numel() * (bits == 4 ? 2 : 1),
             "the quantized tensor does not match its absmax count and blocksize");
  LH_REQUIRE(numel >= 0 && numel <= absmax->numel() * blocksize, "numel exceeds the quantized values");
  at::NoGradGuard no_grad;
  at::Tensor idx = *q;
  if (bits == 4) idx = at::stack({q->bitwise_right_shift(4), q->bitwise_and(15)}, 1).view({-1});
  auto c = code->to(q->device(), at::kFloat);
  auto values = c.index_select(0, idx.to(index_type())).view({absmax->numel(), blocksize}) * absmax->to(at::kFloat).unsqueeze(1);
  return lh::wrap(values.view({-1}).narrow(0, 0, numel).to(static_cast<at::ScalarType>(dtype)));
  LH_CATCH(nullptr)
}

// ---- 4-bit weights ----

namespace {

constexpr int64_t kNestedBlocksize = 256;

// The tensors of a FourBitTensor (C#), validated so that the kernel's raw-pointer reads stay in bounds.
struct FourBit {
  at::Tensor packed, code, absmax, nested_codes, nested_scales, nested_code;
  double offset = 0;
  int64_t blocksize = 0, numel = 0;

  bool nested() const { return !absmax.defined(); }
  int64_t blocks() const { return (numel + blocksize - 1) / blocksize; }

  void validate() const {
    LH_REQUIRE(blocksize > 0 && blocksize % 2 == 0, "4-bit blocksize must be a positive even number");
    LH_REQUIRE(numel > 0, "a 4-bit weight must have at least one value");
    LH_REQUIRE(packed.scalar_type() == at::kByte, "packed 4-bit codes must be uint8");
    LH_REQUIRE(packed.numel() == blocks() * blocksize / 2,
               "packed 4-bit codes hold " + std::to_string(packed.numel()) + " bytes; " + std::to_string(numel) +
                   " values in blocks of " + std::to_string(blocksize) + " need " + std::to_string(blocks() * blocksize / 2));
    LH_REQUIRE(code.scalar_type() == at::kFloat && code.numel() == 16, "the 4-bit code must be 16 float32 values");
    auto same = [&](const at::Tensor& t, const char* what) {
      LH_REQUIRE(t.device() == packed.device(), std::string(what) + " is on " + t.device().str() + " but the packed weight on " +
                                                    packed.device().str() + "; move the whole layer with .to(device)");
    };
    same(code, "the 4-bit code");
    if (!nested()) {
      LH_REQUIRE(absmax.scalar_type() == at::kFloat && absmax.numel() == blocks(),
                 "absmax must hold one float32 per block (" + std::to_string(blocks()) + ")");
      same(absmax, "absmax");
    } else {
      LH_REQUIRE(nested_codes.defined() && nested_scales.defined() && nested_code.defined(),
                 "a double-quantized weight needs its absmax codes, scales and the 8-bit code");
      LH_REQUIRE(nested_codes.scalar_type() == at::kByte && nested_codes.numel() >= blocks() &&
                     nested_codes.numel() % kNestedBlocksize == 0,
                 "double-quantized absmax codes must be uint8, one per block, padded to a multiple of 256");
      LH_REQUIRE(nested_scales.scalar_type() == at::kFloat && nested_scales.numel() == nested_codes.numel() / kNestedBlocksize,
                 "double quantization needs one float32 scale per 256 absmax codes");
      LH_REQUIRE(nested_code.scalar_type() == at::kFloat && nested_code.numel() == 256, "the 8-bit code must be 256 float32 values");
      same(nested_codes, "the absmax codes");
      same(nested_scales, "the absmax scales");
      same(nested_code, "the 8-bit code");
    }
  }

  // fp32 absmax per block (recovered from the 8-bit codes when double-quantized).
  at::Tensor block_absmax() const {
    if (!nested()) return absmax;
    auto values = nested_code.index_select(0, nested_codes.to(index_type())).view({nested_scales.numel(), kNestedBlocksize}) *
                  nested_scales.unsqueeze(1);
    // The offset is a float32 value (the mean of fp32 absmax); adding it as such keeps CPU, CUDA ops and kernel equal.
    return values.view({-1}).narrow(0, 0, blocks()).add(static_cast<double>(static_cast<float>(offset)));
  }

  at::Tensor dequantize_portable(at::ScalarType dtype) const {
    auto idx = at::stack({packed.bitwise_right_shift(4), packed.bitwise_and(15)}, 1).view({-1});
    auto values = code.index_select(0, idx.to(index_type())).view({blocks(), blocksize}) * block_absmax().unsqueeze(1);
    return values.view({-1}).narrow(0, 0, numel).to(dtype);
  }

  bool kernel_available(at::ScalarType dtype) const {
#ifdef LH_WITH_CUDA
    return packed.is_cuda() && (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16);
#else
    return false;
#endif
  }

  at::Tensor dequantize_kernel(at::ScalarType dtype) const {
#ifdef LH_WITH_CUDA
    c10::cuda::CUDAGuard guard(packed.device());
    auto p = packed.contiguous(), c = code.contiguous();
    at::Tensor a, nc, ns, ncode;
    lh_kernels::FourBitView view{};
    view.packed = p.data_ptr<uint8_t>();
    view.code = c.data_ptr<float>();
    view.numel = numel;
    view.blocksize = blocksize;
    if (!nested()) {
      a = absmax.contiguous();
      view.absmax = a.data_ptr<float>();
    } else {
      nc = nested_codes.contiguous();
      ns = nested_scales.contiguous();
      ncode = nested_code.contiguous();
      view.nested_codes = nc.data_ptr<uint8_t>();
      view.nested_scales = ns.data_ptr<float>();
      view.nested_code = ncode.data_ptr<float>();
      view.nested_offset = static_cast<float>(offset);
      view.nested_blocksize = kNestedBlocksize;
    }
    auto out = at::empty({numel}, packed.options().dtype(dtype));
    auto type = dtype == at::kFloat ? lh_kernels::LH_QOUT_F32 : dtype == at::kHalf ? lh_kernels::LH_QOUT_F16 : lh_kernels::LH_QOUT_BF16;
    auto status = lh_kernels::dequantize_4bit(view, out.data_ptr(), type, at::cuda::getCurrentCUDAStream());
    if (status != cudaSuccess) throw std::runtime_error(std::string("4-bit dequantization kernel failed: ") + cudaGetErrorString(status));
    return out;
#else
    (void)dtype;
    throw std::invalid_argument("this LoRAHub native library was built without CUDA kernels");
#endif
  }

  // impl: 0 = the kernel where it applies, else libtorch ops; 1 = libtorch ops; 2 = the kernel (error if unavailable).
  at::Tensor dequantize(at::ScalarType dtype, int impl = 0) const {
    at::NoGradGuard no_grad;
    LH_REQUIRE(impl >= 0 && impl <= 2, "impl must be 0 (auto), 1 (portable) or 2 (CUDA kernel)");
    LH_REQUIRE(at::isFloatingType(dtype), "4-bit weights dequantize to a floating-point dtype");
    if (impl == 2 && !kernel_available(dtype))
      throw std::invalid_argument("the CUDA dequantization kernel needs a CUDA build of the shim, a weight on a CUDA device and "
                                  "an fp32/fp16/bf16 output");
    if (impl != 1 && kernel_available(dtype)) return dequantize_kernel(dtype);
    return dequantize_portable(dtype);
  }
};

FourBit make_fourbit(TH packed, TH code, TH absmax, TH nested_codes, TH nested_scales, TH nested_code, double offset,
                     int64_t blocksize, int64_t numel) {
  LH_REQUIRE(packed && code, "packed codes and the code table are required");
  FourBit w;
  w.packed = *packed;
  w.code = *code;
  if (absmax) w.absmax = *absmax;
  if (nested_codes) w.nested_codes = *nested_codes;
  if (nested_scales) w.nested_scales = *nested_scales;
  if (nested_code) w.nested_code = *nested_code;
  w.offset = offset;
  w.blocksize = blocksize;
  w.numel = numel;
  w.validate();
  return w;
}

void save_fourbit(AutogradContext* ctx, const FourBit& w) {
  // The quantized buffers do not require grad: keeping them in saved_data holds references, never copies.
  ctx->saved_data["packed"] = w.packed;
  ctx->saved_data["code"] = w.code;
  ctx->saved_data["nested"] = w.nested();
  if (w.nested()) {
    ctx->saved_data["nested_codes"] = w.nested_codes;
    ctx->saved_data["nested_scales"] = w.nested_scales;
    ctx->saved_data["nested_code"] = w.nested_code;
  } else {
    ctx->saved_data["absmax"] = w.absmax;
  }
  ctx->saved_data["offset"] = w.offset;
  ctx->saved_data["blocksize"] = w.blocksize;
  ctx->saved_data["numel"] = w.numel;
}

FourBit load_fourbit(AutogradContext* ctx) {
  FourBit w;
  w.packed = ctx->saved_data["packed"].toTensor();
  w.code = ctx->saved_data["code"].toTensor();
  if (ctx->saved_data["nested"].toBool()) {
    w.nested_codes = ctx->saved_data["nested_codes"].toTensor();
    w.nested_scales = ctx->saved_data["nested_scales"].toTensor();
    w.nested_code = ctx->saved_data["nested_code"].toTensor();
  } else {
    w.absmax = ctx->saved_data["absmax"].toTensor();
  }
  w.offset = ctx->saved_data["offset"].toDouble();
  w.blocksize = ctx->saved_data["blocksize"].toInt();
  w.numel = ctx->saved_data["numel"].toInt();
  return w;
}

// y = x·Wᵀ with W (out×in) stored in 4 bits. Forward dequantizes W into a temporary in x's dtype and frees it; backward
// dequantizes again for grad_x = grad·W. W is frozen (no weight gradient), and x is not needed, so autograd keeps only
// references to the quantized buffers: a dequantized weight never outlives the call that made it.
struct Linear4bitFunction : public torch::autograd::Function<Linear4bitFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t handle_w, int64_t out_features, int64_t in_features) {
    const auto& w = *reinterpret_cast<const FourBit*>(handle_w);
    save_fourbit(ctx, w);
    ctx->saved_data["out_features"] = out_features;
    ctx->saved_data["in_features"] = in_features;
    at::NoGradGuard no_grad;
    auto weight = w.dequantize(x.scalar_type()).view({out_features, in_features});
    return at::linear(x, weight);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grad_outputs) {
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      auto w = load_fourbit(ctx);
      auto out_features = ctx->saved_data["out_features"].toInt(), in_features = ctx->saved_data["in_features"].toInt();
      auto grad = grad_outputs[0];
      auto weight = w.dequantize(grad.scalar_type()).view({out_features, in_features});
      grad_x = at::matmul(grad, weight);
    }
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// The 4-bit weight in `dtype` (flat, numel values). absmax is null when double-quantized (then nested_* are given).
LH_API TH lh_dequantize_4bit(TH packed, TH code, TH absmax, TH nested_codes, TH nested_scales, TH nested_code, double offset,
                             int64_t blocksize, int64_t numel, int dtype, int impl) {
  LH_TRY
  auto w = make_fourbit(packed, code, absmax, nested_codes, nested_scales, nested_code, offset, blocksize, numel);
  return lh::wrap(w.dequantize(static_cast<at::ScalarType>(dtype), impl));
  LH_CATCH(nullptr)
}

// fp32 absmax per block of a 4-bit weight (recovered from its 8-bit codes when double-quantized).
LH_API TH lh_fourbit_block_absmax(TH packed, TH code, TH absmax, TH nested_codes, TH nested_scales, TH nested_code, double offset,
                                  int64_t blocksize, int64_t numel) {
  LH_TRY
  auto w = make_fourbit(packed, code, absmax, nested_codes, nested_scales, nested_code, offset, blocksize, numel);
  at::NoGradGuard no_grad;
  return lh::wrap(w.nested() ? w.block_absmax() : w.absmax.clone());
  LH_CATCH(nullptr)
}

// 1 when this shim has the CUDA dequantization kernel.
LH_API int lh_quant_has_cuda_kernels() {
#ifdef LH_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

// x (…, in_features) · Wᵀ for a 4-bit W of shape (out_features, in_features), differentiable in x. The caller casts x to
// the compute dtype and adds the bias.
LH_API TH lh_linear_4bit(TH x, TH packed, TH code, TH absmax, TH nested_codes, TH nested_scales, TH nested_code, double offset,
                         int64_t blocksize, int64_t out_features, int64_t in_features) {
  LH_TRY
  LH_REQUIRE(x, "input is required");
  LH_REQUIRE(out_features > 0 && in_features > 0, "Linear4bit needs positive in and out features");
  auto w = make_fourbit(packed, code, absmax, nested_codes, nested_scales, nested_code, offset, blocksize, out_features * in_features);
  LH_REQUIRE(x->dim() >= 1 && x->size(-1) == in_features,
             "Linear4bit expects inputs of " + std::to_string(in_features) + " features, got shape " + c10::str(x->sizes()));
  LH_REQUIRE(x->is_floating_point(), "Linear4bit inputs must be floating point");
  LH_REQUIRE(x->device() == w.packed.device(),
             "the input is on " + x->device().str() + " but the 4-bit weight on " + w.packed.device().str());
  return lh::wrap(Linear4bitFunction::apply(*x, reinterpret_cast<int64_t>(&w), out_features, in_features));
  LH_CATCH(nullptr)
}
