using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Tests;

[Collection(KernelTestsCollection.Name)] // counts DependentLaunch.Launches, which every kernel of ours adds to (process-wide)
public class DependentLaunchTests
{
    [Fact]
    public void A_program_opts_in_only_when_every_kernel_starts_with_the_sync()
    {
        const string good = """
            #include "lh_common.cuh"
            extern "C" __global__ void a(float* x) { lh_grid_dependency_sync(); x[0] = 1.f; }
            #define K(S) extern "C" __global__ void __launch_bounds__(256, 2) b_##S(float* x) {      \
                lh_grid_dependency_sync();                                                       \
                x[0] = 2.f;                                                                      \
              }
            K(f32)
            """;
        Assert.True(new CudaProgram("good.cu", good, dependentLaunch: true).DependentLaunches);
        var error = Assert.Throws<ArgumentException>(() => new CudaProgram("bad.cu",
            good + "\nextern \"C\" __global__ void late(float* x) { x[0] = 3.f; lh_grid_dependency_sync(); }\n", dependentLaunch: true));
        Assert.Contains("bad.cu: kernel late does not start with lh_grid_dependency_sync();", error.Message);
        // Without the opt-in nothing is checked (third-party kernels), and nothing is launched so.
        Assert.False(new CudaProgram("plain.cu", "extern \"C\" __global__ void p(float* x) { x[0] = 1.f; }").DependentLaunches);
    }

    [Fact]
    public void Every_program_of_ours_takes_dependent_launches()
    {
        // A new program that forgets the opt-in loses the overlap silently; one that opts in without the sync is refused
        // when built (above), so this also proves that every kernel of ours waits for the kernel ahead.
        var programs = LibraryPrograms.Static();
        Assert.True(programs.Count >= 15, $"found only {programs.Count} programs");
        foreach (var (field, program) in programs) Assert.True(program.DependentLaunches, $"{field} is built without dependentLaunch");
    }

    [Fact]
    public void A_consumer_launched_early_still_reads_what_the_producer_wrote()
    {
        if (!cuda.is_available()) return;
        Assert.True(CudaKernels.Available, $"CUDA is available but LoRAHub's kernels are not: {CudaKernels.UnavailableReason}");
        const string source = """
            #include "lh_common.cuh"
            // Each thread waits ~spin cycles before writing, so a consumer scheduled early would find the old values.
            extern "C" __global__ void lh_test_produce(float* buf, i64 n, float v, i64 spin) { lh_grid_dependency_sync();
              const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
              if (i >= n) return;
              u64 t0, t;
              asm volatile("mov.u64 %0, %%clock64;" : "=l"(t0));
              do { asm volatile("mov.u64 %0, %%clock64;" : "=l"(t)); } while (static_cast<i64>(t - t0) < spin);
              buf[i] = v;
            }
            // Reads the element another block of the producer wrote.
            extern "C" __global__ void lh_test_consume(const float* buf, float* out, i64 n) { lh_grid_dependency_sync();
              const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
              if (i < n) out[i] = buf[n - 1 - i] + 1.f;
            }
            """;
        var program = new CudaProgram("dependent_launch_test.cu", source, dependentLaunch: true);
        const int n = 64 * 256, rounds = 40;
        using var scope = NewDisposeScope();
        var device = new Device(DeviceType.CUDA, 0);
        var buf = zeros([n], ScalarType.Float32, device);
        var outs = zeros([rounds, n], ScalarType.Float32, device);
        var produce = program.Function(0, "lh_test_produce");
        var consume = program.Function(0, "lh_test_consume");
        var before = DependentLaunch.Launches;
        for (var k = 0; k < rounds; k++)
        {
            produce.Launch(n / 256, 256, 0, new KernelArgs().Ptr(KernelTensors.Ptr(buf)).I64(n).F32(k + 1).I64(20_000));
            consume.Launch(n / 256, 256, 0, new KernelArgs().Ptr(KernelTensors.Ptr(buf)).Ptr(KernelTensors.Ptr(outs[k])).I64(n));
        }
        var expected = (arange(rounds, ScalarType.Float32, device) + 2).unsqueeze(1).expand(rounds, n);
        Assert.True(Exact.Equal(outs, expected), "a consumer read a value of an earlier round");
        var dependent = DependentLaunch.Enabled && DependentLaunch.Refused is null && CudaKernels.ComputeCapability(0) >= 90;
        Assert.Equal(before + (dependent ? 2 * rounds : 0), DependentLaunch.Launches);
    }
}
