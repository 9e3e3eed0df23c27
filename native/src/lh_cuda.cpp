// CUDA device queries and caching-allocator statistics. Built against a CPU-only libtorch,
// these report "no CUDA" instead of failing, so the same .NET code runs everywhere.
#include "lh_common.h"
#include <mutex>
#ifdef LH_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

LH_API int lh_cuda_is_available() {
#ifdef LH_WITH_CUDA
  try { return at::cuda::is_available() ? 1 : 0; } catch (...) { return 0; }
#else
  return 0;
#endif
}

LH_API int lh_cuda_device_count() {
#ifdef LH_WITH_CUDA
  try { return static_cast<int>(at::cuda::device_count()); } catch (...) { return 0; }
#else
  return 0;
#endif
}

#ifdef LH_WITH_CUDA
// The caching allocator's statistics exist only once the device has been used: touch it first
// (PyTorch's Python API does the same lazy initialisation).
static void ensure_initialized(int device) {
  static std::once_flag flags[64];
  if (device < 0 || device >= 64) throw std::invalid_argument("CUDA device index out of range");
  std::call_once(flags[device], [device] {
    at::empty({1}, at::TensorOptions().device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
  });
}
#define LH_CUDA_ONLY(...) LH_STATUS(__VA_ARGS__)
#else
#define LH_CUDA_ONLY(...) \
  LH_TRY throw std::invalid_argument("this LoRAHub native library was built without CUDA; rebuild it against a CUDA libtorch (set LIBTORCH)"); LH_CATCH(-1)
#endif

LH_API int lh_cuda_synchronize(int device) {
  LH_CUDA_ONLY({
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    c10::cuda::device_synchronize();
  })
}

// which: 0 allocated current, 1 allocated peak, 2 reserved current, 3 reserved peak
LH_API int lh_cuda_memory_stat(int device, int which, int64_t* out) {
  LH_CUDA_ONLY({
    ensure_initialized(device);
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const size_t agg = 0;  // StatType::AGGREGATE
    switch (which) {
      case 0: *out = stats.allocated_bytes[agg].current; break;
      case 1: *out = stats.allocated_bytes[agg].peak; break;
      case 2: *out = stats.reserved_bytes[agg].current; break;
      case 3: *out = stats.reserved_bytes[agg].peak; break;
      default: throw std::invalid_argument("unknown memory statistic");
    }
  })
}

LH_API int lh_cuda_reset_peak_memory_stats(int device) {
  LH_CUDA_ONLY({
    ensure_initialized(device);
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  })
}

LH_API int lh_cuda_empty_cache() { LH_CUDA_ONLY(c10::cuda::CUDACachingAllocator::emptyCache()) }

// Device name (copied into `name`, at most `capacity` bytes), total and free memory.
LH_API int lh_cuda_device_info(int device, char* name, int capacity, int64_t* total, int64_t* free_bytes) {
  LH_CUDA_ONLY({
    auto* props = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device));
    std::snprintf(name, static_cast<size_t>(capacity), "%s", props->name);
    *total = static_cast<int64_t>(props->totalGlobalMem);
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    size_t f = 0, t = 0;
    if (cudaMemGetInfo(&f, &t) != cudaSuccess) throw std::runtime_error("cudaMemGetInfo failed");
    *free_bytes = static_cast<int64_t>(f);
  })
}

LH_API TH lh_cuda_rng_get_state(int device) {
#ifdef LH_WITH_CUDA
  LH_TRY
  auto gen = at::cuda::detail::getDefaultCUDAGenerator(static_cast<c10::DeviceIndex>(device));
  std::lock_guard<std::mutex> lock(gen.mutex());
  return lh::wrap(gen.get_state());
  LH_CATCH(nullptr)
#else
  (void)device;
  lh::set_error(LH_ERR_ARGUMENT, "this LoRAHub native library was built without CUDA");
  return nullptr;
#endif
}

LH_API int lh_cuda_rng_set_state(int device, TH state) {
#ifdef LH_WITH_CUDA
  LH_TRY
  auto gen = at::cuda::detail::getDefaultCUDAGenerator(static_cast<c10::DeviceIndex>(device));
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(*state);
  return 0;
  LH_CATCH(-1)
#else
  (void)device; (void)state;
  lh::set_error(LH_ERR_ARGUMENT, "this LoRAHub native library was built without CUDA");
  return -1;
#endif
}
