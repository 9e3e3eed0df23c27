// Handles, errors, tensor metadata, creation and data transfer.
#include "lh_common.h"
#include <ATen/core/Generator.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <cstring>
#include <sstream>

static thread_local std::string g_error_message;
static thread_local int g_error_kind = LH_ERR_NONE;
static std::atomic<int64_t> g_live_handles{0};

namespace lh {
void set_error(int kind, const char* message) {
  g_error_kind = kind;
  g_error_message = message ? message : "";
}

TH wrap(at::Tensor t) {
  g_live_handles.fetch_add(1, std::memory_order_relaxed);
  return new at::Tensor(std::move(t));
}

std::vector<at::Tensor> unwrap_list(TH* handles, int count) {
  std::vector<at::Tensor> list;
  list.reserve(count);
  for (int i = 0; i < count; i++) {
    LH_REQUIRE(handles[i] != nullptr, "tensor list contains a disposed or null tensor");
    list.push_back(*handles[i]);
  }
  return list;
}

at::Device make_device(int device_type, int device_index) {
  if (device_type == 0) return at::Device(at::kCPU);
  if (device_type == 1) return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index < 0 ? 0 : device_index));
  throw std::invalid_argument("unknown device type " + std::to_string(device_type));
}

at::TensorOptions make_options(int dtype, int device_type, int device_index, bool requires_grad) {
  return at::TensorOptions()
      .dtype(static_cast<at::ScalarType>(dtype))
      .device(make_device(device_type, device_index))
      .requires_grad(requires_grad);
}

at::IntArrayRef dims(const int64_t* values, int count) { return at::IntArrayRef(values, static_cast<size_t>(count)); }
}  // namespace lh

// ---- errors and library info ----

LH_API int lh_last_error_kind() { return g_error_kind; }
LH_API const char* lh_last_error_message() { return g_error_message.c_str(); }
LH_API void lh_clear_error() { g_error_kind = LH_ERR_NONE; g_error_message.clear(); }
LH_API int64_t lh_live_tensors() { return g_live_handles.load(); }

LH_API const char* lh_torch_version() {
  static const std::string v = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                               std::to_string(TORCH_VERSION_PATCH);
  return v.c_str();
}

LH_API int lh_has_cuda_build() {
#ifdef LH_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

LH_API void lh_set_num_threads(int n) { at::set_num_threads(n); }
LH_API int lh_get_num_threads() { return at::get_num_threads(); }

// ---- handle lifetime and metadata ----

LH_API void lh_tensor_free(TH t) {
  if (!t) return;
  delete t;
  g_live_handles.fetch_sub(1, std::memory_order_relaxed);
}

LH_API int lh_tensor_dim(TH t) { return static_cast<int>(t->dim()); }
LH_API void lh_tensor_sizes(TH t, int64_t* out) {
  auto s = t->sizes();
  for (size_t i = 0; i < s.size(); i++) out[i] = s[i];
}
LH_API void lh_tensor_strides(TH t, int64_t* out) {
  auto s = t->strides();
  for (size_t i = 0; i < s.size(); i++) out[i] = s[i];
}
LH_API int64_t lh_tensor_numel(TH t) { return t->numel(); }
LH_API int lh_tensor_dtype(TH t) { return static_cast<int>(t->scalar_type()); }
LH_API int lh_tensor_device_type(TH t) { return t->device().is_cuda() ? 1 : 0; }
LH_API int lh_tensor_device_index(TH t) { return t->device().has_index() ? t->device().index() : 0; }
LH_API int lh_tensor_is_contiguous(TH t) { return t->is_contiguous() ? 1 : 0; }
LH_API int64_t lh_tensor_element_size(TH t) { return static_cast<int64_t>(t->element_size()); }
LH_API int lh_tensor_defined(TH t) { return t && t->defined() ? 1 : 0; }
LH_API int64_t lh_tensor_storage_id(TH t) {
  return reinterpret_cast<int64_t>(t->storage().unsafeGetStorageImpl());
}

// The tensor's version counter (bumped by every in-place write, the optimizers' too): lets caches of values derived
// from a tensor tell when it changed.
LH_API int64_t lh_tensor_version(TH t) { return static_cast<int64_t>(t->_version()); }

LH_API char* lh_tensor_to_string(TH t) {
  LH_TRY
  std::ostringstream os;
  os << *t;
  std::string s = os.str();
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
  LH_CATCH(nullptr)
}
LH_API void lh_free_string(char* s) { std::free(s); }

// ---- creation ----

// kind: 0 zeros, 1 ones, 2 empty, 3 randn, 4 rand
LH_API TH lh_create(int kind, const int64_t* shape, int ndim, int dtype, int dev, int dev_idx, int requires_grad) {
  LH_TRY
  auto opts = lh::make_options(dtype, dev, dev_idx, false);
  auto size = lh::dims(shape, ndim);
  at::Tensor t;
  switch (kind) {
    case 0: t = at::zeros(size, opts); break;
    case 1: t = at::ones(size, opts); break;
    case 2: t = at::empty(size, opts); break;
    case 3: t = at::randn(size, opts); break;
    case 4: t = at::rand(size, opts); break;
    default: throw std::invalid_argument("unknown creation kind");
  }
  if (requires_grad) t.set_requires_grad(true);
  return lh::wrap(t);
  LH_CATCH(nullptr)
}

LH_API TH lh_full(const int64_t* shape, int ndim, double value, int dtype, int dev, int dev_idx, int requires_grad) {
  LH_TRY
  auto t = at::full(lh::dims(shape, ndim), value, lh::make_options(dtype, dev, dev_idx, false));
  if (requires_grad) t.set_requires_grad(true);
  return lh::wrap(t);
  LH_CATCH(nullptr)
}

LH_API TH lh_randint(int64_t low, int64_t high, const int64_t* shape, int ndim, int dtype, int dev, int dev_idx) {
  LH_TENSOR(at::randint(low, high, lh::dims(shape, ndim), lh::make_options(dtype, dev, dev_idx, false)))
}

LH_API TH lh_arange(double start, double end, double step, int dtype, int dev, int dev_idx) {
  LH_TENSOR(at::arange(start, end, step, lh::make_options(dtype, dev, dev_idx, false)))
}

LH_API TH lh_linspace(double start, double end, int64_t steps, int dtype, int dev, int dev_idx) {
  LH_TENSOR(at::linspace(start, end, steps, lh::make_options(dtype, dev, dev_idx, false)))
}

LH_API TH lh_eye(int64_t n, int64_t m, int dtype, int dev, int dev_idx) {
  LH_TENSOR(at::eye(n, m, lh::make_options(dtype, dev, dev_idx, false)))
}

// kind: 0 zeros_like, 1 ones_like, 2 empty_like, 3 randn_like, 4 rand_like
LH_API TH lh_like(int kind, TH t) {
  LH_TRY
  switch (kind) {
    case 0: return lh::wrap(at::zeros_like(*t));
    case 1: return lh::wrap(at::ones_like(*t));
    case 2: return lh::wrap(at::empty_like(*t));
    case 3: return lh::wrap(at::randn_like(*t));
    case 4: return lh::wrap(at::rand_like(*t));
    default: throw std::invalid_argument("unknown *_like kind");
  }
  LH_CATCH(nullptr)
}

LH_API TH lh_full_like(TH t, double value) { LH_TENSOR(at::full_like(*t, value)) }

LH_API TH lh_scalar_tensor(double value, int dtype, int dev, int dev_idx) {
  LH_TENSOR(at::scalar_tensor(value, lh::make_options(dtype, dev, dev_idx, false)))
}

// Copies nbytes from host memory into a new tensor of the given shape/dtype on the given device.
LH_API TH lh_from_buffer(const void* data, int64_t nbytes, const int64_t* shape, int ndim, int dtype, int dev, int dev_idx) {
  LH_TRY
  auto cpu_opts = at::TensorOptions().dtype(static_cast<at::ScalarType>(dtype));
  auto t = at::empty(lh::dims(shape, ndim), cpu_opts);
  int64_t expected = t.numel() * static_cast<int64_t>(t.element_size());
  LH_REQUIRE(expected == nbytes, "buffer holds " + std::to_string(nbytes) + " bytes but the shape needs " +
                                     std::to_string(expected));
  if (nbytes > 0) std::memcpy(t.data_ptr(), data, static_cast<size_t>(nbytes));
  if (dev != 0) t = t.to(lh::make_device(dev, dev_idx));
  return lh::wrap(t);
  LH_CATCH(nullptr)
}

// Copies the tensor's elements (row-major, contiguous) into host memory.
LH_API int lh_copy_to_buffer(TH t, void* dst, int64_t nbytes) {
  LH_TRY
  auto c = t->detach().to(at::kCPU).contiguous();
  int64_t have = c.numel() * static_cast<int64_t>(c.element_size());
  LH_REQUIRE(have == nbytes, "destination holds " + std::to_string(nbytes) + " bytes but the tensor has " +
                                 std::to_string(have));
  if (nbytes > 0) std::memcpy(dst, c.data_ptr(), static_cast<size_t>(nbytes));
  return 0;
  LH_CATCH(-1)
}

LH_API int lh_item_double(TH t, double* out) { LH_STATUS(*out = t->item<double>()) }
LH_API int lh_item_long(TH t, int64_t* out) { LH_STATUS(*out = t->item<int64_t>()) }

// ---- random ----

LH_API int lh_manual_seed(uint64_t seed) { LH_STATUS(at::manual_seed(seed)) }

// The CPU generator state as a uint8 tensor (for checkpoints); CUDA state lives in lh_cuda.cpp.
LH_API TH lh_cpu_rng_get_state() {
  LH_TRY
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return lh::wrap(gen.get_state());
  LH_CATCH(nullptr)
}

LH_API int lh_cpu_rng_set_state(TH state) {
  LH_TRY
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(*state);
  return 0;
  LH_CATCH(-1)
}
