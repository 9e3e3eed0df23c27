using LoRAHub.TorchExtensions.Cuda;
using Xunit;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>A loaded kernel's registers and local memory come from the driver (CUDA only).</summary>
public class CudaFunctionTests
{
    [Fact]
    public void Registers_and_local_memory_are_the_compiled_kernels()
    {
        if (!cuda.is_available()) return;
        Assert.True(CudaKernels.Available, $"CUDA is available but LoRAHub's kernels are not: {CudaKernels.UnavailableReason}");
        const string source = """
            extern "C" __global__ void lh_test_plain(float* x) { x[threadIdx.x] *= 2.f; }
            // A volatile array written and read at run-time indices cannot live in registers: the compiler gives it local
            // memory (without volatile and the writes, NVRTC 13 folded such an array away).
            extern "C" __global__ void lh_test_local(float* x, int i) {
              volatile float a[64];
              for (int j = 0; j < 64; j++) a[j] = x[j * blockDim.x + threadIdx.x];
              a[i & 63] += 1.f;
              float s = 0.f;
              for (int j = 0; j < 64; j++) s += a[j] * a[(7 * j + i) & 63];
              x[threadIdx.x] = s;
            }
            """;
        var program = new CudaProgram("cuda_function_test.cu", source);
        var plain = program.Function(0, "lh_test_plain");
        var local = program.Function(0, "lh_test_local");
        Assert.InRange(plain.Registers, 1, 255);
        Assert.Equal(0, plain.LocalBytes);
        Assert.True(local.LocalBytes >= 64 * sizeof(float), $"{local.Name}: {local.LocalBytes} B of local memory");
    }
}
