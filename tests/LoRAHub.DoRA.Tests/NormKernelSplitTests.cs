using System.Diagnostics;
using static LoRAHub.DoRA.Tests.NormReference;

namespace LoRAHub.DoRA.Tests;

/// <summary>
/// The low-rank norm kernel's column splits (LoraWeightNorms.low_rank_row_norms spreads W's column tiles over one wave of
/// blocks so that every SM works, and the last block of each 64-row range adds the splits' partial sums): on CUDA
/// (LORAHUB_TEST_DEVICE=cuda) against DoraWeightNorm.Direct and the fp64 definition for Llama-1B's projection shapes and
/// for row counts, column tails and ranks that leave partial blocks, tiles and rank chunks; the same bits on a repeated
/// launch (the tickets reset themselves, the sum order is fixed); and other split counts (LowRankBlocksPerSm) agreeing to
/// fp32 rounding. With LORAHUB_DORA_NORM_BENCH=FILE it also times the kernel on the Llama-1B shapes per split setting and
/// appends the lines to FILE. On the CPU the kernel declines (null).
/// </summary>
public class NormKernelSplitTests
{
    private static (Tensor w0, Tensor a, Tensor b) Weights(int rows, int cols, int r, ScalarType baseType, ScalarType adapterType, int seed)
    {
        torchx.manual_seed(seed);
        // W0 as a pretrained weight (std 0.02), A as Kaiming-like, B as after some training: the update is a few % of W0.
        var w0 = torch.randn([rows, cols], ScalarType.Float32, Dev).mul(0.02).to(baseType);
        var a = torch.randn([r, cols], ScalarType.Float32, Dev).mul(1.0 / Math.Sqrt(cols)).to(adapterType);
        var b = torch.randn([rows, r], ScalarType.Float32, Dev).mul(0.01).to(adapterType);
        return (w0, a, b);
    }

    private static T WithBlocksPerSm<T>(int blocksPerSm, Func<T> f)
    {
        var saved = LoraWeightNorms.LowRankBlocksPerSm;
        LoraWeightNorms.LowRankBlocksPerSm = blocksPerSm;
        try
        {
            return f();
        }
        finally
        {
            LoraWeightNorms.LowRankBlocksPerSm = saved;
        }
    }

    [Theory]
    [InlineData(512, 2048, 16, ScalarType.BFloat16, ScalarType.Float32)]   // Llama-1B k/v: 8 row blocks, 16 column splits
    [InlineData(2048, 2048, 16, ScalarType.BFloat16, ScalarType.Float32)]  // q/o
    [InlineData(8192, 2048, 16, ScalarType.BFloat16, ScalarType.Float32)]  // gate/up
    [InlineData(2048, 8192, 16, ScalarType.BFloat16, ScalarType.Float32)]  // down: 64 column tiles
    [InlineData(100, 1000, 16, ScalarType.BFloat16, ScalarType.Float32)]   // a partial row block and a partial last tile
    [InlineData(130, 132, 33, ScalarType.Float16, ScalarType.Float32)]     // 33 vectors (2 tiles, 1 vector in the last); 3 rank chunks
    [InlineData(70, 2049, 1, ScalarType.BFloat16, ScalarType.BFloat16)]    // odd columns: one column per lane, many splits
    [InlineData(65, 64, 24, ScalarType.Float32, ScalarType.Float32)]       // one tile: no split, norms written directly
    public void Split_norms_equal_the_direct_norm(int rows, int cols, int r, ScalarType baseType, ScalarType adapterType)
    {
        using var scope = torch.NewDisposeScope();
        var (w0, a, b) = Weights(rows, cols, r, baseType, adapterType, rows + cols + r);
        const double s = 2.0;
        var launches = LoraWeightNorms.LowRankNormLaunches;
        var norm = LoraWeightNorms.low_rank_row_norms(w0, a, b, s);
        if (!Cuda)
        {
            Assert.Null(norm);
            return;
        }
        Assert.Null(LoraWeightNorms.CompileFailure);
        Assert.NotNull(norm);
        Assert.Equal(launches + 1, LoraWeightNorms.LowRankNormLaunches);
        Assert.Equal(new long[] { rows }, norm!.shape);
        var definition = Definition(w0, a, b, s);
        Assert.True(MaxRelative(norm, definition) < 1e-5, $"kernel vs fp64 definition: {MaxRelative(norm, definition)}");
        var direct = DoraWeightNorm.Direct(w0, a, b, s);
        Assert.True(MaxRelative(norm, direct) < 2e-4, $"kernel vs DoraWeightNorm.Direct: {MaxRelative(norm, direct)}");
        // Launched again (into the first result's storage, as DoRA's step cache does): the same bits, so the tickets
        // were reset and the partials are summed in a fixed order.
        var again = LoraWeightNorms.low_rank_row_norms(w0, a, b, s, output: torch.full([rows], float.NaN, ScalarType.Float32, Dev))!;
        Assert.True(norm.eq(again).all().item<bool>(), "a second launch changed the norms");
    }

    [Fact]
    public void Other_split_counts_agree_and_a_grown_workspace_stays_correct()
    {
        using var scope = torch.NewDisposeScope();
        var (w0, a, b) = Weights(300, 4096, 16, ScalarType.BFloat16, ScalarType.Float32, 11);
        var (w1, a1, b1) = Weights(5000, 640, 8, ScalarType.BFloat16, ScalarType.Float32, 12);
        const double s = 0.5;
        if (!Cuda)
        {
            Assert.Null(LoraWeightNorms.low_rank_row_norms(w0, a, b, s));
            return;
        }
        var expected = Definition(w0, a, b, s);
        var expected1 = Definition(w1, a1, b1, s);
        // 1 block per SM (few splits; none for 5000 rows), the default, and more splits than a wave (one tile per block).
        foreach (var blocksPerSm in new[] { 1, LoraWeightNorms.LowRankBlocksPerSm, 1000 })
        {
            var norm = WithBlocksPerSm(blocksPerSm, () => LoraWeightNorms.low_rank_row_norms(w0, a, b, s)!);
            Assert.True(MaxRelative(norm, expected) < 1e-5, $"{blocksPerSm} blocks per SM: {MaxRelative(norm, expected)}");
            // A shape with more row blocks in between (a larger ticket table) and back.
            var norm1 = WithBlocksPerSm(blocksPerSm, () => LoraWeightNorms.low_rank_row_norms(w1, a1, b1, s)!);
            Assert.True(MaxRelative(norm1, expected1) < 1e-5, $"{blocksPerSm} blocks per SM, 5000 rows: {MaxRelative(norm1, expected1)}");
        }
    }

    // LORAHUB_DORA_NORM_BENCH=FILE: microseconds per launch on the Llama-1B shapes (bf16 W0, fp32 adapters, r = 16), per
    // LowRankBlocksPerSm setting, appended to FILE as lines "norm-bench rows×cols bps=N us=T". Not a speed assertion:
    // the GPU script reads the numbers; the test checks only that each setting still gives the definition's norms.
    [Fact]
    public void Llama_1b_shapes_timed_when_asked()
    {
        var file = Environment.GetEnvironmentVariable("LORAHUB_DORA_NORM_BENCH");
        if (!Cuda || string.IsNullOrEmpty(file)) return;
        var lines = new List<string>();
        foreach (var (rows, cols) in new[] { (512, 2048), (2048, 2048), (8192, 2048), (2048, 8192) })
        {
            using var scope = torch.NewDisposeScope();
            var (w0, a, b) = Weights(rows, cols, 16, ScalarType.BFloat16, ScalarType.Float32, 3);
            var expected = Definition(w0, a, b, 2.0);
            var output = torch.empty([rows], ScalarType.Float32, Dev);
            foreach (var blocksPerSm in new[] { 1, 2, 3, 4, 8, 16 })
            {
                var us = WithBlocksPerSm(blocksPerSm, () =>
                {
                    const int iterations = 200;
                    for (var i = 0; i < 5; i++) LoraWeightNorms.low_rank_row_norms(w0, a, b, 2.0, output);
                    torch.cuda.synchronize();
                    var clock = Stopwatch.StartNew();
                    for (var i = 0; i < iterations; i++) LoraWeightNorms.low_rank_row_norms(w0, a, b, 2.0, output);
                    torch.cuda.synchronize();
                    return clock.Elapsed.TotalMicroseconds / iterations;
                });
                Assert.True(MaxRelative(output, expected) < 1e-5, $"{rows}×{cols}, {blocksPerSm} blocks per SM");
                lines.Add($"norm-bench {rows}x{cols} bps={blocksPerSm} us={us:F1}");
            }
        }
        File.AppendAllLines(file, lines);
    }
}
