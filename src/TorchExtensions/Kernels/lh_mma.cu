// Tensor-core and asynchronous-copy building blocks shared by the kernels that multiply thin (rank-r) tiles on tensor
// cores (FusedOps/LoraMlpKernels.cs, FusedOps/LowRankKernels.cs); included as "lh_mma.cuh" after "lh_common.cuh".
// sm_80 and newer (mma.sync bf16/f16, ldmatrix, cp.async).
#pragma once

// d += a·b for a 16 × 16 tile a (row-major fragment) and a 16 × 8 tile b (column-major fragment), fp32 accumulate.
template <typename T> struct Mma;
template <> struct Mma<bf16> {
  static __device__ __forceinline__ void run(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<f16> {
  static __device__ __forceinline__ void run(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// 8 consecutive 16-bit elements (one 16-byte access).
struct alignas(16) W8 {
  u32 w[4];
};

// Element c of a W8 in fp32 (T: bf16 or f16).
template <typename T> struct Unpack;
template <> struct Unpack<bf16> {
  static __device__ __forceinline__ float at(const W8& v, int c) {
    const u32 w = v.w[c >> 1];
    return __uint_as_float((c & 1) ? (w & 0xffff0000u) : (w << 16));
  }
};
template <> struct Unpack<f16> {
  static __device__ __forceinline__ float at(const W8& v, int c) {
    const u32 w = v.w[c >> 1];
    return f16_to_float(static_cast<u16>((c & 1) ? (w >> 16) : (w & 0xffffu)));
  }
};

// 8 fp32 values rounded to T as one 16-byte pack (lh_round_pair: element 2i in the low half of word i).
template <typename T> __device__ __forceinline__ W8 pack8(const float (&v)[8]) {
  W8 p;
#pragma unroll
  for (int i = 0; i < 4; i++) p.w[i] = lh_round_pair<T>(v[2 * i], v[2 * i + 1]);
  return p;
}

// The shared-window address of a shared-memory pointer (ldmatrix and cp.async take it).
__device__ __forceinline__ u32 shared_address(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// Four 8 × 8 matrices of 16-bit elements; lanes 8i .. 8i + 7 give the row addresses of matrix i (16 bytes each).
// volatile with a memory clobber: a shared tile changes between loop iterations at the same addresses.
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
// The same, each matrix transposed.
__device__ __forceinline__ void ldsm_x4_t(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// 16 bytes from global src to shared dst (a shared-window address), bypassing L1; zeros (nothing read) where `in` is false.
__device__ __forceinline__ void copy16_async(u32 dst, const void* src, bool in) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(in ? 16 : 0) : "memory");
}
__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Until at most N of this thread's newest groups are pending.
template <int N> __device__ __forceinline__ void wait_async() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
