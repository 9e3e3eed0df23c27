// Blockwise codebook quantization (QLoRA's NF4/FP4 and the 8-bit dynamic code for double quantization),
// written with libtorch ops so it runs on CPU and CUDA alike.
#include "lh_common.h"

// x: any shape; code: sorted float32 codebook (16 or 256 values). Each block of `blocksize` values is scaled by its
// absolute maximum and every value replaced by the index of the nearest code value. 4-bit indices are packed two
// per byte, first value in the high nibble (bitsandbytes' order). Returns packed/indices (uint8) and absmax (fp32).
LH_API int lh_quantize_blockwise(TH x, TH code, int64_t blocksize, int bits, TH* out_q, TH* out_absmax) {
  LH_TRY
  LH_REQUIRE(bits == 4 || bits == 8, "bits must be 4 or 8");
  LH_REQUIRE(blocksize > 0 && blocksize % 2 == 0, "blocksize must be a positive even number");
  at::NoGradGuard no_grad;
  auto flat = x->detach().reshape({-1}).to(at::kFloat);
  int64_t n = flat.numel();
  int64_t blocks = (n + blocksize - 1) / blocksize;
  if (blocks * blocksize != n) flat = at::constant_pad_nd(flat, {0, blocks * blocksize - n}, 0);
  auto view = flat.view({blocks, blocksize});
  auto absmax = view.abs().amax(1);
  auto scale = at::where(absmax > 0, absmax, at::ones_like(absmax));
  auto normed = view / scale.unsqueeze(1);
  auto c = code->to(flat.device(), at::kFloat);
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
  at::NoGradGuard no_grad;
  at::Tensor idx = *q;
  if (bits == 4) idx = at::stack({q->bitwise_right_shift(4), q->bitwise_and(15)}, 1).view({-1});
#if TORCH_VERSION_MAJOR >= 2
  auto index = idx.to(at::kInt);
#else
  auto index = idx.to(at::kLong);
#endif
  auto c = code->to(q->device(), at::kFloat);
  auto values = c.index_select(0, index).view({absmax->numel(), blocksize}) * absmax->unsqueeze(1);
  return lh::wrap(values.view({-1}).narrow(0, 0, numel).to(static_cast<at::ScalarType>(dtype)));
  LH_CATCH(nullptr)
}
