// Shared helpers for the LoRAHub native shim: handle wrapping and the exception boundary.
// Every exported function catches all C++ exceptions and records them in a thread-local slot,
// so bad input surfaces in .NET as a typed exception instead of aborting the process.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/version.h>
#include <cstdint>
#include <string>
#include <vector>

#define LH_API extern "C" __attribute__((visibility("default")))

typedef at::Tensor* TH;

// Error kinds; LoRAHub.Torch.TorchErrorKind mirrors these values.
enum LhErrorKind {
  LH_ERR_NONE = 0,
  LH_ERR_GENERIC = 1,
  LH_ERR_OUT_OF_MEMORY = 2,
  LH_ERR_INDEX = 3,
  LH_ERR_VALUE = 4,
  LH_ERR_TYPE = 5,
  LH_ERR_NOT_IMPLEMENTED = 6,
  LH_ERR_ARGUMENT = 7,
};

namespace lh {
void set_error(int kind, const char* message);
TH wrap(at::Tensor t);                // heap-allocates a handle owned by .NET
std::vector<at::Tensor> unwrap_list(TH* handles, int count);
at::Device make_device(int device_type, int device_index);
at::TensorOptions make_options(int dtype, int device_type, int device_index, bool requires_grad);
at::IntArrayRef dims(const int64_t* values, int count);
}  // namespace lh

#define LH_TRY try {
#define LH_CATCH(failure)                                                        \
  }                                                                              \
  catch (const c10::OutOfMemoryError& e) {                                       \
    lh::set_error(LH_ERR_OUT_OF_MEMORY, e.what_without_backtrace());             \
  }                                                                              \
  catch (const c10::IndexError& e) {                                             \
    lh::set_error(LH_ERR_INDEX, e.what_without_backtrace());                     \
  }                                                                              \
  catch (const c10::ValueError& e) {                                             \
    lh::set_error(LH_ERR_VALUE, e.what_without_backtrace());                     \
  }                                                                              \
  catch (const c10::TypeError& e) {                                              \
    lh::set_error(LH_ERR_TYPE, e.what_without_backtrace());                      \
  }                                                                              \
  catch (const c10::NotImplementedError& e) {                                    \
    lh::set_error(LH_ERR_NOT_IMPLEMENTED, e.what_without_backtrace());           \
  }                                                                              \
  catch (const c10::Error& e) {                                                  \
    lh::set_error(LH_ERR_GENERIC, e.what_without_backtrace());                   \
  }                                                                              \
  catch (const std::invalid_argument& e) {                                       \
    lh::set_error(LH_ERR_ARGUMENT, e.what());                                    \
  }                                                                              \
  catch (const std::bad_alloc& e) {                                              \
    lh::set_error(LH_ERR_OUT_OF_MEMORY, "host memory allocation failed (std::bad_alloc)"); \
  }                                                                              \
  catch (const std::exception& e) {                                              \
    lh::set_error(LH_ERR_GENERIC, e.what());                                     \
  }                                                                              \
  catch (...) {                                                                  \
    lh::set_error(LH_ERR_GENERIC, "unknown native exception");                   \
  }                                                                              \
  return failure;

// Returns a new handle, or nullptr with the error recorded.
#define LH_TENSOR(expr) LH_TRY return lh::wrap(expr); LH_CATCH(nullptr)
// Runs a statement; returns 0 on success, -1 with the error recorded.
#define LH_STATUS(...) LH_TRY __VA_ARGS__; return 0; LH_CATCH(-1)

#define LH_REQUIRE(cond, msg) \
  do { if (!(cond)) throw std::invalid_argument(msg); } while (0)
