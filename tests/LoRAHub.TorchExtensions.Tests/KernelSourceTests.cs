using System.Reflection;
using LoRAHub.TorchExtensions.Cuda;
using Xunit;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The tensor-core programs that share lh_mma.cuh, the RMSNorm row kernels (whose forwards share their per-row
/// device functions) and the cross-entropy kernels, compile with the NVRTC found here (a machine with the CUDA toolkit but no GPU, e.g. a
/// developer's): an edit to shared device code cannot break one of them unnoticed. Without NVRTC nothing is
/// checked; on CUDA the kernel tests compile and load them anyway.
/// </summary>
public class KernelSourceTests
{
    private static string Const(Type type, string name) =>
        (string)type.GetField(name, BindingFlags.NonPublic | BindingFlags.Static)!.GetRawConstantValue()!;

    public static TheoryData<string> Programs => new() { "lora_mlp_mma", "lora_mlp_mma_pipe", "lora_down_residual", "lora_lowrank", "rms_norm_rows", "cross_entropy" };

    [Theory]
    [MemberData(nameof(Programs))]
    public void Shared_header_programs_compile_with_nvrtc(string name)
    {
        if (Nvrtc.EnsureLoaded() is not null || TestDevice.IsCuda) return;
        var mlp = typeof(LoraMlpKernels);
        var source = name switch
        {
            "lora_mlp_mma" => Const(mlp, "Helpers") + "\n" + Const(mlp, "RegisterKernels"),
            "lora_mlp_mma_pipe" => Const(mlp, "Helpers") + "\n" + Const(mlp, "PipelinedKernels") + "\n" + Const(mlp, "PipelinedEntries"),
            "lora_down_residual" => Const(typeof(LoraDownResidualKernels), "Source"),
            "rms_norm_rows" => Const(typeof(RmsNormKernels), "Source"),
            "cross_entropy" => Const(typeof(CrossEntropyKernels), "Source"),
            _ => Const(typeof(LowRankKernels), "Source") + "LH_LOWRANK_ALL(bf16, bf16)\n",
        };
        Assert.NotEmpty(Nvrtc.Compile(name + ".cu", source, CudaKernels.Headers, 90, []));
    }
}
