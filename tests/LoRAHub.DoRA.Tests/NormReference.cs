namespace LoRAHub.DoRA.Tests;

/// <summary>What the norm kernel tests compare against: the test device and the fp64 definition of ‖W0 + s·B·A‖.</summary>
internal static class NormReference
{
    public static readonly Device Dev = torch.device(Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") ?? "cpu");

    public static bool Cuda => Dev.type == DeviceType.CUDA;

    /// <summary>
    /// Norms computed by a kernel so far: launches of the per-projection kernel plus projections of the grouped one (a
    /// training step computes its norms grouped, DoraNormGroup).
    /// </summary>
    public static long KernelNorms => LoraWeightNorms.LowRankNormLaunches + LoraWeightNorms.GroupedNormItems;

    /// <summary>max_i |actual_i − expected_i| / expected_i, in fp64.</summary>
    public static double MaxRelative(Tensor actual, Tensor expected)
    {
        var e = expected.to(ScalarType.Float64);
        return actual.to(ScalarType.Float64).sub(e).abs().div(e.abs().clamp_min(1e-30)).max().ToDouble();
    }

    /// <summary>‖W0 + s·B·A‖ per row in fp64 from the tensors as they are (W0 already rounded to its dtype).</summary>
    public static Tensor Definition(Tensor w0, Tensor a, Tensor b, double s) =>
        w0.to(ScalarType.Float64).add(b.to(ScalarType.Float64).matmul(a.to(ScalarType.Float64)), alpha: s).norm(dim: 1);
}
