using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;
using static LoRAHub.TorchExtensions.Cuda.KernelTensors;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// ‖W_i‖² per row in fp32 of a frozen weight in one read (DoRA's base norms, recomputed each training step): one block per
/// row sums the squares in fp32 registers, where the tensor ops (widen to fp32, square, sum) read and write an fp32 copy
/// of W more. CUDA only (fp32, fp16, bf16 contiguous 2-D); elsewhere, or with LORAHUB_LORA_ROWSCALE_KERNELS=0, null and
/// the caller's ops run.
/// </summary>
public static class LoraWeightNorms
{
    private static readonly CudaProgram program = new("lora_weight_norms.cu", Source);

    /// <summary>‖W_i‖² (rows, fp32) of <paramref name="w"/> (rows × cols), or null where the kernel does not apply.</summary>
    public static Tensor? row_norms_squared(Tensor w)
    {
        if (!LoraRowScaleKernels.Enabled || !Usable(w) || w.dim() != 2 || w.numel() == 0 || !w.is_contiguous()
            || !LoraRowScaleKernels.Compiles(program, Source, DeviceIndex(w)))
            return null;
        long rows = w.size(0), cols = w.size(1);
        var output = empty([rows], ScalarType.Float32, w.device);
        var v = VectorWidth(w.dtype);
        var vec = cols % v == 0 && Aligned16(Ptr(w));
        var work = vec ? cols / v : cols;
        program.Function(DeviceIndex(w), $"lh_lora_row_sumsq_{Suffix(w.dtype)}_{(vec ? "v" : "1")}")
            .Launch((int)rows, (int)Math.Clamp((work + 31) / 32 * 32, 64, 512), 0, new KernelArgs().Ptr(Ptr(w)).Ptr(Ptr(output)).I64(cols));
        return output;
    }

    // One block per row (as the RMSNorm kernels): strided vector loads, fp32 sum of squares, block_sum.
    private const string Source = """
        #include "lh_common.cuh"

        template <typename T, int N>
        __device__ __forceinline__ void row_sumsq(const T* __restrict__ w, float* __restrict__ out, i64 cols) {
          __shared__ float red[32];
          const i64 row = blockIdx.x;
          const T* wr = w + row * cols;
          const i64 nvec = cols / N;
          float ss = 0.f;
          for (i64 i = threadIdx.x; i < nvec; i += blockDim.x) {
            const Pack<T, N> p = load_pack<T, N>(wr, i);
        #pragma unroll
            for (int k = 0; k < N; k++) {
              const float v = Cvt<T>::to(p.v[k]);
              ss = fmaf(v, v, ss);
            }
          }
          ss = block_sum(ss, red);
          if (threadIdx.x == 0) out[row] = ss;
        }

        #define LH_WIDTH_1(T) 1
        #define LH_WIDTH_v(T) (16 / sizeof(T))

        #define LH_SUMSQ_ENTRIES(T, S, V)                                                                        \
          extern "C" __global__ void lh_lora_row_sumsq_##S##_##V(const T* w, float* out, i64 cols) {            \
            row_sumsq<T, LH_WIDTH_##V(T)>(w, out, cols);                                                        \
          }

        LH_SUMSQ_ENTRIES(float, f32, 1)
        LH_SUMSQ_ENTRIES(float, f32, v)
        LH_SUMSQ_ENTRIES(f16, f16, 1)
        LH_SUMSQ_ENTRIES(f16, f16, v)
        LH_SUMSQ_ENTRIES(bf16, bf16, 1)
        LH_SUMSQ_ENTRIES(bf16, bf16, v)
        """;
}
