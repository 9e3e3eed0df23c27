// CUDA unified (managed) memory for paged optimizer state, as bitsandbytes' paged optimizers use it: state tensors live
// in cudaMallocManaged memory, so under GPU memory pressure the driver pages them out to host memory instead of the run
// ending with an out-of-memory error, and they are prefetched back to the GPU before each optimizer step.
// A request never exceeds the GPU's free memory (cudaMemGetInfo) minus a headroom: asking for more managed memory than
// the card has free can stall the whole GPU, so such a request fails with a clear error instead.
#include "lh_common.h"
#include <atomic>
#ifdef LH_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace {
std::atomic<int64_t> g_managed_bytes{0};
std::atomic<int64_t> g_managed_count{0};

#ifdef LH_WITH_CUDA
void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state of the runtime
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(status));
  }
}

bool concurrent_managed_access(int device) {
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, device), "cudaDeviceGetAttribute");
  return value != 0;
}

void prefetch(void* ptr, size_t bytes, int device, bool to_host, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  cudaMemLocation location{};
  location.type = to_host ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  location.id = to_host ? 0 : device;
  check_cuda(cudaMemPrefetchAsync(ptr, bytes, location, 0, stream), "cudaMemPrefetchAsync");
#else
  check_cuda(cudaMemPrefetchAsync(ptr, bytes, to_host ? cudaCpuDeviceId : device, stream), "cudaMemPrefetchAsync");
#endif
}

bool is_managed(const void* ptr) {
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, ptr) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attributes.type == cudaMemoryTypeManaged;
}
#endif

constexpr const char* kNoCuda = "this LoRAHub native library was built without CUDA: paged (unified-memory) state needs a CUDA build";
}  // namespace

// A zero-filled tensor on cuda:device whose memory is CUDA managed memory, freed (cudaFree) with the last reference.
// Fails (out-of-memory error, nothing allocated) when bytes + headroom_bytes exceed the GPU's free memory, after first
// returning the caching allocator's unused blocks to the driver.
LH_API TH lh_managed_zeros(const int64_t* shape, int ndim, int dtype, int device, int64_t headroom_bytes) {
#ifdef LH_WITH_CUDA
  LH_TRY
  LH_REQUIRE(ndim >= 0 && ndim <= 16, "bad number of dimensions");
  LH_REQUIRE(headroom_bytes >= 0, "headroom must be non-negative");
  LH_REQUIRE(device >= 0 && device < static_cast<int>(at::cuda::device_count()), "CUDA device index out of range");
  auto type = static_cast<at::ScalarType>(dtype);
  std::vector<int64_t> sizes(shape, shape + ndim);
  int64_t numel = 1;
  for (auto s : sizes) {
    LH_REQUIRE(s >= 0, "negative dimension");
    numel *= s;
  }
  auto options = at::TensorOptions().dtype(type).device(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  if (numel == 0) return lh::wrap(at::zeros(sizes, options));
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(type);
  size_t free_bytes = 0, total_bytes = 0;
  check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  if (bytes + static_cast<size_t>(headroom_bytes) > free_bytes) {
    c10::cuda::CUDACachingAllocator::emptyCache();
    check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  }
  if (bytes + static_cast<size_t>(headroom_bytes) > free_bytes) {
    auto mib = [](double b) { return std::to_string(static_cast<int64_t>(b / (1 << 20))); };
    std::string message = "paged optimizer state: " + mib(bytes) + " MiB of unified memory requested but cuda:" + std::to_string(device) +
                          " has only " + mib(free_bytes) + " MiB free (" + mib(headroom_bytes) +
                          " MiB kept as headroom); unified memory is never requested beyond the GPU's free memory. Free GPU memory "
                          "(smaller batch, activation checkpointing) or turn the paged optimizer off (paged_optimizer = false)";
    lh::set_error(LH_ERR_OUT_OF_MEMORY, message.c_str());
    return nullptr;
  }
  void* ptr = nullptr;
  check_cuda(cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal), "cudaMallocManaged");
  g_managed_bytes += static_cast<int64_t>(bytes);
  g_managed_count += 1;
  at::Tensor t;
  try {
    t = at::from_blob(
        ptr, sizes,
        [bytes](void* p) {
          cudaFree(p);  // synchronizes with pending work on the device
          g_managed_bytes -= static_cast<int64_t>(bytes);
          g_managed_count -= 1;
        },
        options);
  } catch (...) {
    cudaFree(ptr);
    g_managed_bytes -= static_cast<int64_t>(bytes);
    g_managed_count -= 1;
    throw;
  }
  auto stream = at::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device));
  // First touch on the GPU: the pages are created there (no host round trip), then zeroed in stream order.
  if (concurrent_managed_access(device)) prefetch(ptr, bytes, device, false, stream.stream());
  check_cuda(cudaMemsetAsync(ptr, 0, bytes, stream.stream()), "cudaMemsetAsync");
  return lh::wrap(t);
  LH_CATCH(nullptr)
#else
  lh::set_error(LH_ERR_ARGUMENT, kNoCuda);
  return nullptr;
#endif
}

// Moves a managed tensor's pages to its GPU (to_host = 0) or to host memory (to_host = 1), asynchronously on the
// current stream. A no-op for memory that is not managed or where the device cannot prefetch (bitsandbytes' rule).
LH_API int lh_managed_prefetch(TH t, int to_host) {
#ifdef LH_WITH_CUDA
  LH_TRY
  if (!t->is_cuda() || t->numel() == 0) return 0;
  void* ptr = t->data_ptr();
  if (!is_managed(ptr)) return 0;
  int device = t->device().index();
  c10::cuda::CUDAGuard guard(t->device());
  if (!concurrent_managed_access(device)) return 0;
  prefetch(ptr, t->numel() * t->element_size(), device, to_host != 0, at::cuda::getCurrentCUDAStream(device).stream());
  return 0;
  LH_CATCH(-1)
#else
  (void)t; (void)to_host;
  return 0;
#endif
}

// 1 when the tensor's memory is CUDA managed memory.
LH_API int lh_managed_is_managed(TH t) {
#ifdef LH_WITH_CUDA
  try {
    return t->is_cuda() && t->numel() > 0 && is_managed(t->data_ptr()) ? 1 : 0;
  } catch (...) {
    return 0;
  }
#else
  (void)t;
  return 0;
#endif
}

// Bytes and number of live managed allocations made by lh_managed_zeros.
LH_API int64_t lh_managed_bytes() { return g_managed_bytes.load(); }
LH_API int64_t lh_managed_count() { return g_managed_count.load(); }
