// Elementwise math, reductions, shape and indexing operations.
// Op codes are small enums so that one exported function serves a whole family;
// LoRAHub.Torch.Native mirrors the numbering.
#include "lh_common.h"

enum UnaryOp {
  U_NEG, U_ABS, U_EXP, U_LOG, U_SQRT, U_RSQRT, U_SIN, U_COS, U_TANH, U_SIGMOID,
  U_RELU, U_SILU, U_GELU, U_GELU_TANH, U_SQUARE, U_RECIPROCAL, U_FLOOR, U_CEIL, U_ROUND, U_SIGN,
  U_LOG1P, U_CONTIGUOUS, U_CLONE, U_DETACH, U_LOGICAL_NOT, U_ISNAN, U_ISINF, U_ISFINITE, U_ERF, U_TRUNC,
  U_EXPM1, U_T,
};

static at::Tensor unary(int op, const at::Tensor& a) {
  switch (op) {
    case U_NEG: return a.neg();
    case U_ABS: return a.abs();
    case U_EXP: return a.exp();
    case U_LOG: return a.log();
    case U_SQRT: return a.sqrt();
    case U_RSQRT: return a.rsqrt();
    case U_SIN: return a.sin();
    case U_COS: return a.cos();
    case U_TANH: return a.tanh();
    case U_SIGMOID: return a.sigmoid();
    case U_RELU: return a.relu();
    case U_SILU: return at::silu(a);
    case U_GELU: return at::gelu(a);
    case U_GELU_TANH: return at::gelu(a, "tanh");
    case U_SQUARE: return a.square();
    case U_RECIPROCAL: return a.reciprocal();
    case U_FLOOR: return a.floor();
    case U_CEIL: return a.ceil();
    case U_ROUND: return a.round();
    case U_SIGN: return a.sign();
    case U_LOG1P: return a.log1p();
    case U_CONTIGUOUS: return a.contiguous();
    case U_CLONE: return a.clone();
    case U_DETACH: return a.detach();
    case U_LOGICAL_NOT: return a.logical_not();
    case U_ISNAN: return a.isnan();
    case U_ISINF: return a.isinf();
    case U_ISFINITE: return a.isfinite();
    case U_ERF: return a.erf();
    case U_TRUNC: return a.trunc();
    case U_EXPM1: return a.expm1();
    case U_T: return a.t();
    default: throw std::invalid_argument("unknown unary op " + std::to_string(op));
  }
}

LH_API TH lh_unary(int op, TH a) { LH_TENSOR(unary(op, *a)) }

// In-place unary ops that libtorch offers.
LH_API int lh_unary_(int op, TH a) {
  LH_TRY
  switch (op) {
    case U_NEG: a->neg_(); break;
    case U_ABS: a->abs_(); break;
    case U_EXP: a->exp_(); break;
    case U_LOG: a->log_(); break;
    case U_SQRT: a->sqrt_(); break;
    case U_RSQRT: a->rsqrt_(); break;
    case U_TANH: a->tanh_(); break;
    case U_SIGMOID: a->sigmoid_(); break;
    case U_RELU: a->relu_(); break;
    case U_SILU: at::silu_(*a); break;
    case U_SQUARE: a->square_(); break;
    case U_RECIPROCAL: a->reciprocal_(); break;
    case U_FLOOR: a->floor_(); break;
    case U_DETACH: a->detach_(); break;
    default: throw std::invalid_argument("unary op " + std::to_string(op) + " has no in-place form");
  }
  return 0;
  LH_CATCH(-1)
}

enum BinaryOp {
  B_ADD, B_SUB, B_MUL, B_DIV, B_POW, B_MAXIMUM, B_MINIMUM, B_EQ, B_NE, B_LT,
  B_LE, B_GT, B_GE, B_MATMUL, B_LOGICAL_AND, B_LOGICAL_OR, B_REMAINDER, B_ATAN2, B_FLOOR_DIVIDE, B_RSUB,
  B_RDIV, B_RPOW, B_BITWISE_AND, B_BITWISE_OR, B_BITWISE_XOR, B_LSHIFT, B_RSHIFT,
};

static at::Tensor binary(int op, const at::Tensor& a, const at::Tensor& b, double alpha) {
  switch (op) {
    case B_ADD: return alpha == 1.0 ? a.add(b) : a.add(b, alpha);
    case B_SUB: return alpha == 1.0 ? a.sub(b) : a.sub(b, alpha);
    case B_MUL: return a.mul(b);
    case B_DIV: return a.div(b);
    case B_POW: return a.pow(b);
    case B_MAXIMUM: return at::maximum(a, b);
    case B_MINIMUM: return at::minimum(a, b);
    case B_EQ: return a.eq(b);
    case B_NE: return a.ne(b);
    case B_LT: return a.lt(b);
    case B_LE: return a.le(b);
    case B_GT: return a.gt(b);
    case B_GE: return a.ge(b);
    case B_MATMUL: return a.matmul(b);
    case B_LOGICAL_AND: return a.logical_and(b);
    case B_LOGICAL_OR: return a.logical_or(b);
    case B_REMAINDER: return a.remainder(b);
    case B_ATAN2: return a.atan2(b);
    case B_FLOOR_DIVIDE: return a.div(b, "floor");
    case B_BITWISE_AND: return a.bitwise_and(b);
    case B_BITWISE_OR: return a.bitwise_or(b);
    case B_BITWISE_XOR: return a.bitwise_xor(b);
    case B_LSHIFT: return a.__lshift__(b);
    case B_RSHIFT: return a.__rshift__(b);
    default: throw std::invalid_argument("unknown binary op " + std::to_string(op));
  }
}

LH_API TH lh_binary(int op, TH a, TH b, double alpha) { LH_TENSOR(binary(op, *a, *b, alpha)) }

static at::Scalar make_scalar(double value, int is_integral) {
  return is_integral ? at::Scalar(static_cast<int64_t>(value)) : at::Scalar(value);
}

static at::Tensor binary_scalar(int op, const at::Tensor& a, const at::Scalar& s) {
  switch (op) {
    case B_ADD: return a.add(s);
    case B_SUB: return a.sub(s);
    case B_MUL: return a.mul(s);
    case B_DIV: return a.div(s);
    case B_POW: return a.pow(s);
    case B_MAXIMUM: return a.clamp_min(s);
    case B_MINIMUM: return a.clamp_max(s);
    case B_EQ: return a.eq(s);
    case B_NE: return a.ne(s);
    case B_LT: return a.lt(s);
    case B_LE: return a.le(s);
    case B_GT: return a.gt(s);
    case B_GE: return a.ge(s);
    case B_REMAINDER: return a.remainder(s);
    case B_FLOOR_DIVIDE: return a.div(s, "floor");
    case B_RSUB: return at::rsub(a, s);
    case B_RDIV: return a.reciprocal().mul(s);
    case B_RPOW: return at::pow(s, a);
    case B_BITWISE_AND: return a.bitwise_and(s);
    case B_BITWISE_OR: return a.bitwise_or(s);
    case B_BITWISE_XOR: return a.bitwise_xor(s);
    default: throw std::invalid_argument("binary op " + std::to_string(op) + " has no scalar form");
  }
}

LH_API TH lh_binary_scalar(int op, TH a, double value, int is_integral) {
  LH_TENSOR(binary_scalar(op, *a, make_scalar(value, is_integral)))
}

LH_API int lh_binary_(int op, TH a, TH b, double alpha) {
  LH_TRY
  switch (op) {
    case B_ADD: a->add_(*b, alpha); break;
    case B_SUB: a->sub_(*b, alpha); break;
    case B_MUL: a->mul_(*b); break;
    case B_DIV: a->div_(*b); break;
    case B_POW: a->pow_(*b); break;
    default: throw std::invalid_argument("binary op " + std::to_string(op) + " has no in-place form");
  }
  return 0;
  LH_CATCH(-1)
}

LH_API int lh_binary_scalar_(int op, TH a, double value, int is_integral) {
  LH_TRY
  auto s = make_scalar(value, is_integral);
  switch (op) {
    case B_ADD: a->add_(s); break;
    case B_SUB: a->sub_(s); break;
    case B_MUL: a->mul_(s); break;
    case B_DIV: a->div_(s); break;
    case B_POW: a->pow_(s); break;
    case B_MAXIMUM: a->clamp_min_(s); break;
    case B_MINIMUM: a->clamp_max_(s); break;
    default: throw std::invalid_argument("binary op " + std::to_string(op) + " has no in-place scalar form");
  }
  return 0;
  LH_CATCH(-1)
}

LH_API int lh_copy_(TH dst, TH src) { LH_STATUS(dst->copy_(*src)) }
LH_API int lh_fill_(TH dst, double value) { LH_STATUS(dst->fill_(value)) }
LH_API int lh_zero_(TH dst) { LH_STATUS(dst->zero_()) }
LH_API int lh_uniform_(TH dst, double from, double to) { LH_STATUS(dst->uniform_(from, to)) }
LH_API int lh_normal_(TH dst, double mean, double std) { LH_STATUS(dst->normal_(mean, std)) }
LH_API int lh_masked_fill_(TH dst, TH mask, double value) { LH_STATUS(dst->masked_fill_(*mask, value)) }
LH_API int lh_addmm_(TH dst, TH a, TH b, double beta, double alpha) { LH_STATUS(dst->addmm_(*a, *b, beta, alpha)) }

LH_API TH lh_addcmul(TH self, TH a, TH b, double value) { LH_TENSOR(at::addcmul(*self, *a, *b, value)) }
LH_API TH lh_addmm(TH self, TH a, TH b, double beta, double alpha) { LH_TENSOR(at::addmm(*self, *a, *b, beta, alpha)) }
LH_API TH lh_lerp(TH a, TH b, double weight) { LH_TENSOR(at::lerp(*a, *b, weight)) }
LH_API TH lh_where(TH cond, TH a, TH b) { LH_TENSOR(at::where(*cond, *a, *b)) }
LH_API TH lh_clamp(TH a, double min, double max, int has_min, int has_max) {
  LH_TRY
  c10::optional<at::Scalar> lo, hi;
  if (has_min) lo = min;
  if (has_max) hi = max;
  return lh::wrap(at::clamp(*a, lo, hi));
  LH_CATCH(nullptr)
}
LH_API TH lh_masked_fill(TH a, TH mask, double value) { LH_TENSOR(a->masked_fill(*mask, value)) }
LH_API TH lh_to(TH a, int dtype, int dev, int dev_idx, int non_blocking, int copy) {
  LH_TRY
  auto opts = at::TensorOptions().dtype(static_cast<at::ScalarType>(dtype)).device(lh::make_device(dev, dev_idx));
  return lh::wrap(a->to(opts, non_blocking != 0, copy != 0));
  LH_CATCH(nullptr)
}
LH_API TH lh_type_as(TH a, int dtype) { LH_TENSOR(a->to(static_cast<at::ScalarType>(dtype))) }
LH_API TH lh_alias(TH a) { LH_TENSOR(*a) }  // a second handle to the same tensor
LH_API int lh_allclose(TH a, TH b, double rtol, double atol, int* out) { LH_STATUS(*out = at::allclose(*a, *b, rtol, atol) ? 1 : 0) }
LH_API int lh_equal(TH a, TH b, int* out) { LH_STATUS(*out = at::equal(*a, *b) ? 1 : 0) }

// ---- reductions ----

enum ReduceOp { R_SUM, R_MEAN, R_AMAX, R_AMIN, R_PROD, R_STD, R_VAR, R_LOGSUMEXP, R_ANY, R_ALL, R_NORM };

LH_API TH lh_reduce(int op, TH a, const int64_t* dim_values, int ndims, int keepdim, int has_dims) {
  LH_TRY
  const at::Tensor& t = *a;
  bool kd = keepdim != 0;
  at::IntArrayRef d = lh::dims(dim_values, ndims);
  if (!has_dims) {
    switch (op) {
      case R_SUM: return lh::wrap(t.sum());
      case R_MEAN: return lh::wrap(t.mean());
      case R_AMAX: return lh::wrap(t.max());
      case R_AMIN: return lh::wrap(t.min());
      case R_PROD: return lh::wrap(t.prod());
      case R_STD: return lh::wrap(t.std());
      case R_VAR: return lh::wrap(t.var());
      case R_ANY: return lh::wrap(t.any());
      case R_ALL: return lh::wrap(t.all());
      case R_NORM: return lh::wrap(t.norm());
      case R_LOGSUMEXP: {
        std::vector<int64_t> all(t.dim());
        for (int64_t i = 0; i < t.dim(); i++) all[i] = i;
        return lh::wrap(t.logsumexp(all, false));
      }
      default: throw std::invalid_argument("unknown reduction " + std::to_string(op));
    }
  }
  switch (op) {
    case R_SUM: return lh::wrap(t.sum(d, kd));
    case R_MEAN: return lh::wrap(t.mean(d, kd));
    case R_AMAX: return lh::wrap(t.amax(d, kd));
    case R_AMIN: return lh::wrap(t.amin(d, kd));
    case R_PROD: LH_REQUIRE(ndims == 1, "prod reduces one dimension"); return lh::wrap(t.prod(d[0], kd));
    case R_STD: return lh::wrap(t.std(d, true, kd));
    case R_VAR: return lh::wrap(t.var(d, true, kd));
    case R_LOGSUMEXP: return lh::wrap(t.logsumexp(d, kd));
    case R_ANY: LH_REQUIRE(ndims == 1, "any reduces one dimension"); return lh::wrap(t.any(d[0], kd));
    case R_ALL: LH_REQUIRE(ndims == 1, "all reduces one dimension"); return lh::wrap(t.all(d[0], kd));
    case R_NORM: return lh::wrap(at::norm(t, 2, d, kd));
    default: throw std::invalid_argument("unknown reduction " + std::to_string(op));
  }
  LH_CATCH(nullptr)
}

LH_API TH lh_sum_dtype(TH a, int dtype) { LH_TENSOR(a->sum(static_cast<at::ScalarType>(dtype))) }

// kind: 0 argmax, 1 argmin
LH_API TH lh_argext(int kind, TH a, int64_t dim, int keepdim, int has_dim) {
  LH_TRY
  c10::optional<int64_t> d;
  if (has_dim) d = dim;
  return lh::wrap(kind == 0 ? a->argmax(d, keepdim != 0) : a->argmin(d, keepdim != 0));
  LH_CATCH(nullptr)
}

// kind: 0 max, 1 min, 2 sort(descending=keepdim flag), returns values + indices
LH_API int lh_max_dim(int kind, TH a, int64_t dim, int flag, TH* values, TH* indices) {
  LH_TRY
  std::tuple<at::Tensor, at::Tensor> r;
  if (kind == 0) r = a->max(dim, flag != 0);
  else if (kind == 1) r = a->min(dim, flag != 0);
  else r = a->sort(dim, flag != 0);
  *values = lh::wrap(std::get<0>(r));
  *indices = lh::wrap(std::get<1>(r));
  return 0;
  LH_CATCH(-1)
}

LH_API int lh_topk(TH a, int64_t k, int64_t dim, int largest, TH* values, TH* indices) {
  LH_TRY
  auto r = a->topk(k, dim, largest != 0, true);
  *values = lh::wrap(std::get<0>(r));
  *indices = lh::wrap(std::get<1>(r));
  return 0;
  LH_CATCH(-1)
}

LH_API TH lh_cumsum(TH a, int64_t dim) { LH_TENSOR(a->cumsum(dim)) }
LH_API TH lh_multinomial(TH probs, int64_t n, int replacement) { LH_TENSOR(at::multinomial(*probs, n, replacement != 0)) }

// ---- shape and indexing ----

LH_API TH lh_view(TH a, const int64_t* shape, int n) { LH_TENSOR(a->view(lh::dims(shape, n))) }
LH_API TH lh_reshape(TH a, const int64_t* shape, int n) { LH_TENSOR(a->reshape(lh::dims(shape, n))) }
LH_API TH lh_expand(TH a, const int64_t* shape, int n) { LH_TENSOR(a->expand(lh::dims(shape, n))) }
LH_API TH lh_repeat(TH a, const int64_t* reps, int n) { LH_TENSOR(a->repeat(lh::dims(reps, n))) }
LH_API TH lh_permute(TH a, const int64_t* order, int n) { LH_TENSOR(a->permute(lh::dims(order, n))) }
LH_API TH lh_transpose(TH a, int64_t d0, int64_t d1) { LH_TENSOR(a->transpose(d0, d1)) }
LH_API TH lh_unsqueeze(TH a, int64_t dim) { LH_TENSOR(a->unsqueeze(dim)) }
LH_API TH lh_squeeze(TH a, int64_t dim, int has_dim) { LH_TENSOR(has_dim ? a->squeeze(dim) : a->squeeze()) }
LH_API TH lh_flatten(TH a, int64_t start, int64_t end) { LH_TENSOR(a->flatten(start, end)) }
LH_API TH lh_narrow(TH a, int64_t dim, int64_t start, int64_t length) { LH_TENSOR(a->narrow(dim, start, length)) }
LH_API TH lh_select(TH a, int64_t dim, int64_t index) { LH_TENSOR(a->select(dim, index)) }
LH_API TH lh_slice(TH a, int64_t dim, int64_t start, int64_t end, int64_t step) { LH_TENSOR(a->slice(dim, start, end, step)) }
LH_API TH lh_index_select(TH a, int64_t dim, TH index) { LH_TENSOR(a->index_select(dim, *index)) }
LH_API TH lh_index(TH a, TH index) { LH_TENSOR(a->index({*index})) }
LH_API TH lh_gather(TH a, int64_t dim, TH index) { LH_TENSOR(a->gather(dim, *index)) }
LH_API TH lh_scatter(TH a, int64_t dim, TH index, TH src) { LH_TENSOR(a->scatter(dim, *index, *src)) }
LH_API TH lh_index_add(TH a, int64_t dim, TH index, TH src) { LH_TENSOR(a->index_add(dim, *index, *src)) }
LH_API int lh_index_put_(TH a, TH index, TH values) { LH_STATUS(a->index_put_({*index}, *values)) }
LH_API TH lh_tril(TH a, int64_t diagonal) { LH_TENSOR(a->tril(diagonal)) }
LH_API TH lh_triu(TH a, int64_t diagonal) { LH_TENSOR(a->triu(diagonal)) }
LH_API TH lh_repeat_interleave(TH a, int64_t repeats, int64_t dim) { LH_TENSOR(a->repeat_interleave(repeats, dim)) }
LH_API TH lh_roll(TH a, int64_t shift, int64_t dim) { LH_TENSOR(a->roll(shift, dim)) }
LH_API TH lh_diag(TH a, int64_t diagonal) { LH_TENSOR(a->diag(diagonal)) }
LH_API TH lh_outer(TH a, TH b) { LH_TENSOR(at::outer(*a, *b)) }
LH_API TH lh_one_hot(TH a, int64_t num_classes) { LH_TENSOR(at::one_hot(*a, num_classes)) }
LH_API TH lh_nonzero(TH a) { LH_TENSOR(a->nonzero()) }

LH_API TH lh_cat(TH* list, int n, int64_t dim) { LH_TENSOR(at::cat(lh::unwrap_list(list, n), dim)) }
LH_API TH lh_stack(TH* list, int n, int64_t dim) { LH_TENSOR(at::stack(lh::unwrap_list(list, n), dim)) }

// Writes up to `capacity` handles into `out`; returns how many, or -1 on error.
static int write_list(const std::vector<at::Tensor>& parts, TH* out, int capacity) {
  LH_REQUIRE(static_cast<int>(parts.size()) <= capacity, "more parts than the output can hold");
  for (size_t i = 0; i < parts.size(); i++) out[i] = lh::wrap(parts[i]);
  return static_cast<int>(parts.size());
}

LH_API int lh_chunk(TH a, int64_t chunks, int64_t dim, TH* out, int capacity) {
  LH_TRY return write_list(a->chunk(chunks, dim), out, capacity); LH_CATCH(-1)
}
LH_API int lh_split(TH a, const int64_t* sizes, int n, int64_t dim, TH* out, int capacity) {
  LH_TRY return write_list(a->split_with_sizes(lh::dims(sizes, n), dim), out, capacity); LH_CATCH(-1)
}
LH_API int lh_unbind(TH a, int64_t dim, TH* out, int capacity) {
  LH_TRY return write_list(a->unbind(dim), out, capacity); LH_CATCH(-1)
}

// ---- linear algebra ----

// kind: 0 reduced SVD U,S,Vh (out has three handles)
LH_API int lh_svd(TH a, int full_matrices, TH* u, TH* s, TH* vh) {
  LH_TRY
  auto r = at::linalg_svd(*a, full_matrices != 0);
  *u = lh::wrap(std::get<0>(r));
  *s = lh::wrap(std::get<1>(r));
  *vh = lh::wrap(std::get<2>(r));
  return 0;
  LH_CATCH(-1)
}
LH_API int lh_qr(TH a, TH* q, TH* r) {
  LH_TRY
  auto res = at::linalg_qr(*a);
  *q = lh::wrap(std::get<0>(res));
  *r = lh::wrap(std::get<1>(res));
  return 0;
  LH_CATCH(-1)
}
LH_API TH lh_vector_norm(TH a, double ord, const int64_t* dim_values, int ndims, int keepdim, int has_dims) {
  LH_TRY
  c10::optional<at::IntArrayRef> d;
  if (has_dims) d = lh::dims(dim_values, ndims);
  return lh::wrap(at::linalg_vector_norm(*a, ord, d, keepdim != 0));
  LH_CATCH(nullptr)
}
