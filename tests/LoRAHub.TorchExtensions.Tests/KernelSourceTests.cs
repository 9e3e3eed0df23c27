using System.Reflection;
using LoRAHub.TorchExtensions.Cuda;
using Xunit;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// Every CUDA program of this library (each static <see cref="CudaProgram"/> field, and the LoRA MLP kernels' default
/// variant programs, which are built on first use) compiles for sm_90 with the NVRTC found here (a machine with the CUDA
/// toolkit but no GPU, e.g. a developer's or CI's): an edit to a shared header or a kernel cannot break a program
/// unnoticed until a GPU run. Without NVRTC nothing is checked; on CUDA the kernel tests compile and load them anyway.
/// </summary>
public class KernelSourceTests
{
    // Name → (source, headers, options), as each program hands them to NVRTC.
    private static Dictionary<string, (string Source, IReadOnlyDictionary<string, string> Headers, string[] Options)> All()
    {
        var all = new Dictionary<string, (string, IReadOnlyDictionary<string, string>, string[])>();
        T Field<T>(CudaProgram p, string name) =>
            (T)typeof(CudaProgram).GetField(name, BindingFlags.NonPublic | BindingFlags.Instance)!.GetValue(p)!;
        foreach (var (_, p) in LibraryPrograms.Static())
            all.TryAdd(p.Name, (Field<string>(p, "source"), Field<IReadOnlyDictionary<string, string>>(p, "headers"), Field<string[]>(p, "options")));
        var (lora, dora) = (LoraMlpKernels.DefaultVariantPair, LoraMlpKernels.DefaultRowScaleVariantPair);
        foreach (var (op, v) in new[] { ("fwd", lora.Forward), ("bwd", lora.Backward), ("fwd", dora.Forward), ("bwd", dora.Backward) })
            all.TryAdd($"lora_mlp_mma_{op}_{v!.Value.Name}", (LoraMlpKernels.VariantSource(op, v.Value, "bf16", fastSigmoid: true), CudaKernels.Headers, []));
        return all;
    }

    public static TheoryData<string> Programs => new(All().Keys.Order());

    [Fact]
    public void Every_program_is_listed()
    {
        // The fused blocks' programs at least: a reflection slip must not empty the theory.
        var names = All().Keys;
        foreach (var name in new[] { "lora_mlp_mma.cu", "lora_mlp_mma_pipe.cu", "lora_down_residual.cu", "lora_lowrank_bf16.cu", "rms_norm_rows.cu",
                     "cross_entropy.cu", "fused.cu", "optim.cu", "rope_gqa.cu", "lora_grouped_norms_pipe.cu", "foreach_copy.cu" })
            Assert.Contains(name, names);
        Assert.True(names.Count >= 18, $"{names.Count} programs");
    }

    // The GEMM path's kernels are sized by macros the launcher repeats as constants: the largest rank (A·Aᵀ and A's
    // stages in shared memory) and the columns a block of the split-and-Gram launch takes (its grid and partials).
    [Theory]
    [InlineData("LH_GEMM_MAX_RANK", LoraWeightNorms.GemmMaxRank)]
    [InlineData("LH_GEMM_SPLIT_COLS", LoraWeightNorms.GramColumns)]
    public void The_gemm_norm_kernels_have_the_layout_their_launcher_sizes(string macro, int value)
    {
        var defined = System.Text.RegularExpressions.Regex.Match(LoraWeightNorms.GemmSource, $@"#define {macro} (\d+)\b");
        Assert.True(defined.Success, $"{macro} is not defined");
        Assert.Equal(value, int.Parse(defined.Groups[1].Value));
    }

    // LORAHUB_BF16_BIT_ROUNDING defines a macro ahead of lh_common's text; the hardware branches of its bf16 rounding
    // (float_to_bf16, lh_round_pair) must test that very macro, or the switch would silently stop switching.
    [Fact]
    public void The_bit_rounding_switch_defines_the_macro_the_bf16_rounding_tests()
    {
        var header = CudaKernels.Headers["lh_common.cuh"];
        var guard = $"!defined({CudaKernels.BitRoundingMacro})";
        Assert.Equal(2, (header.Length - header.Replace(guard, "").Length) / guard.Length);
        Assert.Equal(CudaKernels.BitRoundingBf16, header.StartsWith($"#define {CudaKernels.BitRoundingMacro}\n", StringComparison.Ordinal));
    }

    // Pairs of values are rounded to 16 bits in one place, lh_common's lh_round_pair: a program with a conversion of its
    // own would keep it under the switch above, and its copy would drift from the others.
    [Theory]
    [MemberData(nameof(Programs))]
    public void Program_rounds_pairs_through_lh_common(string name)
    {
        var (source, _, _) = All()[name];
        Assert.DoesNotContain("cvt.rn.bf16x2", source);
        Assert.DoesNotContain("cvt.rn.f16x2", source);
    }

    [Theory]
    [MemberData(nameof(Programs))]
    public void Program_compiles_with_nvrtc_for_sm90(string name)
    {
        if (Nvrtc.EnsureLoaded() is not null || TestDevice.IsCuda) return;
        var (source, headers, options) = All()[name];
        Assert.NotEmpty(Nvrtc.Compile(name, source, headers, 90, options));
    }
}
