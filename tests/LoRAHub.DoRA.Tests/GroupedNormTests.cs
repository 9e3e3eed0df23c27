using System.Diagnostics;
using LoRAHub.Models.Llama;
using LoRAHub.TorchExtensions.Optim;
using Fused = LoRAHub.TorchExtensions.torchx.nn.functional.Fused;
using static LoRAHub.DoRA.Tests.NormReference;

namespace LoRAHub.DoRA.Tests;

/// <summary>
/// DoRA's grouped norm kernel (LoraWeightNorms.grouped_low_rank_row_norms: every projection's ‖W0 + s·B·A‖ and row scale
/// m/‖V‖ in one launch) on CUDA (LORAHUB_TEST_DEVICE=cuda): each item against the fp64 definition and the per-projection
/// kernel for mixed shapes, dtypes (two dtype combinations: two launches), ranks over one chunk, odd and misaligned
/// columns; c with the bits of m.div(norm); an item's bits independent of its group; the pipelined block code with the
/// bits of the plain one; the GEMM path (the default; bf16 W, fp32 adapters, rank ≤ 64: cuBLAS products and a combining
/// kernel) against the definition and the FMA kernels, in chunks, and which items it refuses; all-or-nothing refusals. And in training (DoraNormGroup): a tiny Llama's first forward of each
/// step fills all 14 projections' caches by one grouped launch (the per-projection kernel never runs), the row scales
/// the fused blocks take (DividedRowScale: the kernel's c, m, ‖V‖) follow the definition after the optimizer steps and
/// equal RowScale's m.div(norm) bit for bit, and the losses are those of the per-projection norms.
/// On the CPU the grouped kernel declines (false, nothing written) and training takes the per-projection path.
/// </summary>
public class GroupedNormTests
{
    private static LoraWeightNorms.LowRankNormItem Item(int rows, int cols, int r, ScalarType baseType, ScalarType adapterType,
        double s, int seed, bool misaligned = false, bool scale = true)
    {
        torchx.manual_seed(seed);
        var flat = torch.randn([rows * cols + 1], ScalarType.Float32, Dev).mul(0.02).to(baseType);
        var w0 = (misaligned ? flat.narrow(0, 1, rows * cols) : flat.narrow(0, 0, rows * cols)).view(rows, cols);
        var a = torch.randn([r, cols], ScalarType.Float32, Dev).mul(1.0 / Math.Sqrt(cols)).to(adapterType);
        var b = torch.randn([rows, r], ScalarType.Float32, Dev).mul(0.02).to(adapterType);
        var m = torch.rand([rows], ScalarType.Float32, Dev).add(0.5).to(adapterType);
        var norm = torch.full([rows], -1f, ScalarType.Float32, Dev);
        return new LoraWeightNorms.LowRankNormItem(w0, a, b, s, norm, scale ? m : null, scale ? torch.full([rows], -1f, ScalarType.Float32, Dev) : null);
    }

    private static List<LoraWeightNorms.LowRankNormItem> Mixed() =>
    [
        Item(512, 2048, 16, ScalarType.BFloat16, ScalarType.Float32, 2.0, 1),     // Llama-1B k/v
        Item(2048, 8192, 16, ScalarType.BFloat16, ScalarType.Float32, 2.0, 2),    // down: the longest blocks, first in the grid
        Item(100, 1000, 20, ScalarType.BFloat16, ScalarType.Float32, 1.5, 3),     // a partial row block and tile; 2 rank chunks
        Item(70, 37, 5, ScalarType.BFloat16, ScalarType.Float32, 0.5, 4),         // odd columns: one column per lane (another launch)
        Item(24, 256, 8, ScalarType.BFloat16, ScalarType.Float32, 1.0, 5, misaligned: true),
        Item(65, 64, 64, ScalarType.BFloat16, ScalarType.Float32, 3.0, 6, scale: false), // one tile; rank 64; the norm only
    ];

    [Fact]
    public void Grouped_norms_and_row_scales_equal_the_definition_and_the_division()
    {
        using var scope = torch.NewDisposeScope();
        var items = Mixed();
        var (launches, count, gemmItems) = (LoraWeightNorms.GroupedNormLaunches, LoraWeightNorms.GroupedNormItems, LoraWeightNorms.GroupedGemmItems);
        var ran = LoraWeightNorms.grouped_low_rank_row_norms(items);
        if (!Cuda)
        {
            Assert.False(ran);
            Assert.True(items.All(i => i.Norm.eq(-1).all().item<bool>()), "the CPU wrote a norm");
            return;
        }
        Assert.Null(LoraWeightNorms.GroupedCompileFailure);
        Assert.True(ran);
        // The GEMM path takes every item but the misaligned one (bf16 W, fp32 adapters, ranks ≤ 64), which the FMA kernels
        // take in one launch (one column per lane); without it they take all in two (and vectors of 4 columns).
        var gemm = LoraWeightNorms.GroupedGemm;
        Assert.Null(LoraWeightNorms.GroupedGemmCompileFailure);
        Assert.Equal(launches + (gemm ? 1 : 2), LoraWeightNorms.GroupedNormLaunches);
        Assert.Equal(count + items.Count, LoraWeightNorms.GroupedNormItems);
        Assert.Equal(gemmItems + (gemm ? items.Count - 1 : 0), LoraWeightNorms.GroupedGemmItems);
        AssertNormsAndScales(items, "grouped");
    }

    // Each item's norms within 1e-5 of the fp64 definition and of the per-projection kernel (only the order of the fp32 sums
    // differs: no column splits in a group; the GEMM path sums the factored terms), and c = m.div(norm) to the bit.
    private static void AssertNormsAndScales(IEnumerable<LoraWeightNorms.LowRankNormItem> items, string by)
    {
        foreach (var it in items)
        {
            var what = $"{it.W.size(0)}x{it.W.size(1)} r{it.A.size(0)}";
            var definition = Definition(it.W, it.A, it.B, it.Scaling);
            Assert.True(MaxRelative(it.Norm, definition) < 1e-5, $"{what}: {by} vs fp64 definition {MaxRelative(it.Norm, definition)}");
            var single = LoraWeightNorms.low_rank_row_norms(it.W, it.A, it.B, it.Scaling)!;
            Assert.True(MaxRelative(it.Norm, single) < 1e-5, $"{what}: {by} vs per-projection kernel {MaxRelative(it.Norm, single)}");
            if (it.Scale is null) continue;
            var c = it.Magnitude!.div(it.Norm);
            Assert.True(it.Scale.eq(c).all().item<bool>(), $"{what}: c is not m.div(norm) to the bit (off by {it.Scale.sub(c).abs().max().ToDouble()})");
        }
    }

    [Fact]
    public void An_items_bits_do_not_depend_on_its_group_and_a_repeat()
    {
        using var scope = torch.NewDisposeScope();
        var items = Mixed();
        if (!LoraWeightNorms.grouped_low_rank_row_norms(items))
        {
            Assert.False(Cuda, "the grouped kernel declined on CUDA");
            return;
        }
        for (var i = 0; i < items.Count; i++)
        {
            var it = items[i];
            var alone = it with { Norm = torch.zeros_like(it.Norm), Scale = it.Scale is null ? null : torch.zeros_like(it.Scale) };
            Assert.True(LoraWeightNorms.grouped_low_rank_row_norms([alone]));
            Assert.True(alone.Norm.eq(it.Norm).all().item<bool>(), $"item {i}: alone differs from in the group");
            if (it.Scale is not null) Assert.True(alone.Scale!.eq(it.Scale).all().item<bool>(), $"item {i}: c alone differs");
        }
        var first = items.Select(i => i.Norm.clone()).ToList();
        Assert.True(LoraWeightNorms.grouped_low_rank_row_norms(items));
        for (var i = 0; i < items.Count; i++) Assert.True(first[i].eq(items[i].Norm).all().item<bool>(), $"item {i}: a repeat differs");
    }

    // The grouped kernels with these switches, restored after: the FMA kernels pipelined or plain, the GEMM path on
    // (the default) or off (LORAHUB_DORA_NORM_GEMM=0).
    private static T WithKernels<T>(bool pipelined, bool gemm, Func<T> f)
    {
        var saved = (LoraWeightNorms.GroupedPipelined, LoraWeightNorms.GroupedGemm);
        (LoraWeightNorms.GroupedPipelined, LoraWeightNorms.GroupedGemm) = (pipelined, gemm);
        try
        {
            return f();
        }
        finally
        {
            (LoraWeightNorms.GroupedPipelined, LoraWeightNorms.GroupedGemm) = saved;
        }
    }

    [Fact]
    public void The_gemm_path_matches_the_definition_and_the_fma_kernels_in_chunks()
    {
        using var scope = torch.NewDisposeScope();
        List<LoraWeightNorms.LowRankNormItem> items =
        [
            Item(2048, 8192, 16, ScalarType.BFloat16, ScalarType.Float32, 2.0, 31),   // down
            Item(512, 2048, 16, ScalarType.BFloat16, ScalarType.Float32, 2.0, 32),    // k/v: three of one shape, chunked below
            Item(512, 2048, 16, ScalarType.BFloat16, ScalarType.Float32, 0.5, 33),
            Item(512, 2048, 16, ScalarType.BFloat16, ScalarType.Float32, 1.0, 34),
            Item(100, 1000, 16, ScalarType.BFloat16, ScalarType.Float32, 1.5, 35),    // a partial 128-row block
            Item(300, 64, 5, ScalarType.BFloat16, ScalarType.Float32, 0.5, 36),       // an odd rank
            Item(70, 37, 9, ScalarType.BFloat16, ScalarType.Float32, 3.0, 37),        // odd columns
            Item(65, 128, 64, ScalarType.BFloat16, ScalarType.Float32, 1.0, 39, scale: false), // rank 64; the norm only
        ];
        var others = new[]
        {
            Item(24, 256, 8, ScalarType.BFloat16, ScalarType.Float32, 1.0, 38, misaligned: true), // W off 16 bytes: cuBLAS's batched
                                                                                                 // GEMMs assume aligned matrices
            Item(64, 128, 16, ScalarType.Float16, ScalarType.Float32, 1.0, 40),       // fp16 W: the FMA kernels
            Item(64, 128, 65, ScalarType.BFloat16, ScalarType.Float32, 1.0, 41),      // rank over 64
            Item(64, 128, 16, ScalarType.BFloat16, ScalarType.BFloat16, 1.0, 42),     // bf16 adapters
        };
        Assert.All(others, o => Assert.False(LoraWeightNorms.GemmApplies(o)));
        if (!Cuda)
        {
            Assert.All(items, i => Assert.False(LoraWeightNorms.GemmApplies(i)));
            return;
        }
        Assert.All(items, i => Assert.True(LoraWeightNorms.GemmApplies(i)));
        var (launches, gemmItems, chunks) = (LoraWeightNorms.GroupedNormLaunches, LoraWeightNorms.GroupedGemmItems, LoraWeightNorms.GroupedGemmChunks);
        // Room for the products of two k/v items a chunk: the three take two chunks; every other shape one.
        var savedBytes = LoraWeightNorms.GemmChunkBytes;
        LoraWeightNorms.GemmChunkBytes = 2L * 512 * 32 * 4;
        try
        {
            Assert.True(WithKernels(true, true, () => LoraWeightNorms.grouped_low_rank_row_norms(items.Concat(others).ToList())));
        }
        finally
        {
            LoraWeightNorms.GemmChunkBytes = savedBytes;
        }
        Assert.Null(LoraWeightNorms.GroupedGemmCompileFailure);
        Assert.Equal(launches + 4, LoraWeightNorms.GroupedNormLaunches);    // the others: an FMA launch per dtype combination and width
        Assert.Equal(gemmItems + items.Count, LoraWeightNorms.GroupedGemmItems);
        Assert.Equal(chunks + 7, LoraWeightNorms.GroupedGemmChunks);
        AssertNormsAndScales(items.Concat(others), "GEMM path");
        // Off: the same items by the FMA kernels, within fp32 rounding of these.
        var fmaItems = items.Select(i => i with { Norm = torch.zeros_like(i.Norm), Scale = i.Scale is null ? null : torch.zeros_like(i.Scale) }).ToList();
        Assert.True(WithKernels(true, false, () => LoraWeightNorms.grouped_low_rank_row_norms(fmaItems)));
        Assert.Equal(gemmItems + items.Count, LoraWeightNorms.GroupedGemmItems);
        for (var i = 0; i < items.Count; i++)
            Assert.True(MaxRelative(items[i].Norm, fmaItems[i].Norm) < 1e-5, $"item {i}: GEMM path vs FMA group {MaxRelative(items[i].Norm, fmaItems[i].Norm)}");
    }

    [Fact]
    public void The_pipelined_block_code_has_the_bits_of_the_plain_one()
    {
        using var scope = torch.NewDisposeScope();
        List<LoraWeightNorms.LowRankNormItem> Ranks16() =>
        [
            Item(2048, 2048, 16, ScalarType.BFloat16, ScalarType.Float32, 2.0, 21),   // q/o: 16 tiles of A double-buffered
            Item(100, 1000, 16, ScalarType.BFloat16, ScalarType.Float32, 1.5, 22),    // a partial row block and last tile
            Item(130, 132, 5, ScalarType.Float16, ScalarType.Float32, 1.0, 23),       // 33 vectors: 2 tiles; rank 5
            Item(48, 2048, 16, ScalarType.BFloat16, ScalarType.BFloat16, 0.5, 24),    // bf16 adapters and m
            Item(65, 64, 16, ScalarType.Float32, ScalarType.Float32, 3.0, 25),        // one tile
            Item(70, 37, 3, ScalarType.BFloat16, ScalarType.Float32, 0.5, 26),        // one column per lane
        ];
        var (plain, r16) = (Ranks16(), Ranks16());
        if (!WithKernels(false, false, () => LoraWeightNorms.grouped_low_rank_row_norms(plain)))
        {
            Assert.False(Cuda, "the grouped kernel declined on CUDA");
            return;
        }
        Assert.True(WithKernels(true, false, () => LoraWeightNorms.grouped_low_rank_row_norms(r16)));
        Assert.Null(LoraWeightNorms.GroupedPipeCompileFailure);
        for (var i = 0; i < plain.Count; i++)
        {
            Assert.True(r16[i].Norm.eq(plain[i].Norm).all().item<bool>(),
                $"item {i}: pipelined vs plain, off by {MaxRelative(r16[i].Norm, plain[i].Norm)}");
            Assert.True(r16[i].Scale!.eq(plain[i].Scale!).all().item<bool>(), $"item {i}: c differs");
            var definition = Definition(r16[i].W, r16[i].A, r16[i].B, r16[i].Scaling);
            Assert.True(MaxRelative(r16[i].Norm, definition) < 1e-5, $"item {i}: vs fp64 definition {MaxRelative(r16[i].Norm, definition)}");
        }
    }

    [Fact]
    public void The_group_is_refused_whole_when_one_item_does_not_fit()
    {
        using var scope = torch.NewDisposeScope();
        var good = Item(64, 128, 4, ScalarType.BFloat16, ScalarType.Float32, 1.0, 7);
        var bad = new[]
        {
            good with { W = good.W.to(ScalarType.Float64), A = good.A.to(ScalarType.Float64), B = good.B.to(ScalarType.Float64) },
            good with { A = torch.randn([128, 4], ScalarType.Float32, Dev).t() },                      // A not contiguous
            good with { B = good.B.to(ScalarType.BFloat16) },                                          // A, B types differ
            good with { Norm = torch.empty([64], ScalarType.Float16, Dev) },                           // the norm is fp32
            good with { Norm = torch.empty([63], ScalarType.Float32, Dev) },                           // one per row
            good with { Magnitude = good.Magnitude!.to(ScalarType.BFloat16) },                         // m in A's type
            good with { Scale = null },                                                                // m without c
        };
        var (launches, count) = (LoraWeightNorms.GroupedNormLaunches, LoraWeightNorms.GroupedNormItems);
        foreach (var b in bad)
        {
            Assert.False(LoraWeightNorms.GroupedApplies(b));
            Assert.False(LoraWeightNorms.grouped_low_rank_row_norms([good, b]));
        }
        var saved = LoraWeightNorms.GroupedNorms;
        try
        {
            LoraWeightNorms.GroupedNorms = false;                                                      // LORAHUB_DORA_NORM_GROUPED=0
            Assert.False(LoraWeightNorms.grouped_low_rank_row_norms([good]));
        }
        finally
        {
            LoraWeightNorms.GroupedNorms = saved;
        }
        Assert.Equal((launches, count), (LoraWeightNorms.GroupedNormLaunches, LoraWeightNorms.GroupedNormItems));
        Assert.True(good.Norm.eq(-1).all().item<bool>(), "a refused group wrote a norm");
        Assert.Equal(Cuda, LoraWeightNorms.grouped_low_rank_row_norms([good]));
    }

    // LORAHUB_DORA_GROUPED_BENCH=FILE: one llama-1b step's norms (16 layers × q, k, v, o, gate, up, down; bf16 W0, fp32
    // adapters and m, r = 16) by 112 per-projection launches and by one grouped launch, microseconds per step (host clock
    // around 20 repeats, synchronized: the GPU's time, as it runs behind) and the host's own time to issue them, appended to
    // FILE as "grouped-bench ..." lines. Not a speed assertion: the test checks that both give the same norms.
    [Fact]
    public void Llama_1b_step_norms_timed_when_asked()
    {
        var file = Environment.GetEnvironmentVariable("LORAHUB_DORA_GROUPED_BENCH");
        if (!Cuda || string.IsNullOrEmpty(file)) return;
        using var scope = torch.NewDisposeScope();
        var shapes = new[] { (2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192) };
        var items = new List<LoraWeightNorms.LowRankNormItem>();
        for (var layer = 0; layer < 16; layer++)
            foreach (var (rows, cols) in shapes)
                items.Add(Item(rows, cols, 16, ScalarType.BFloat16, ScalarType.Float32, 2.0, items.Count));
        var single = items.Select(i => torch.empty_like(i.Norm)).ToList();
        (double gpu, double host) Time(Action step)
        {
            const int repeats = 20;
            for (var i = 0; i < 3; i++) step();
            torch.cuda.synchronize();
            var clock = Stopwatch.StartNew();
            var issue = TimeSpan.Zero;
            for (var i = 0; i < repeats; i++)
            {
                var start = clock.Elapsed;
                step();
                issue += clock.Elapsed - start;
            }
            torch.cuda.synchronize();
            return (clock.Elapsed.TotalMicroseconds / repeats, issue.TotalMicroseconds / repeats);
        }
        var perProjection = Time(() =>
        {
            for (var i = 0; i < items.Count; i++) LoraWeightNorms.low_rank_row_norms(items[i].W, items[i].A, items[i].B, 2.0, single[i]);
        });
        var lines = new List<string>
        {
            $"grouped-bench per-projection launches=112 us_per_step={perProjection.gpu:F0} host_us={perProjection.host:F0}",
        };
        foreach (var pipelined in new[] { false, true })
        {
            var grouped = WithKernels(pipelined, false, () => Time(() => Assert.True(LoraWeightNorms.grouped_low_rank_row_norms(items))));
            for (var i = 0; i < items.Count; i++)
                Assert.True(MaxRelative(items[i].Norm, single[i]) < 1e-5, $"pipelined {pipelined}, item {i}: grouped vs per-projection {MaxRelative(items[i].Norm, single[i])}");
            lines.Add($"grouped-bench grouped pipelined={pipelined} launches=1 us_per_step={grouped.gpu:F0} host_us={grouped.host:F0}");
        }
        // The GEMM path, prepared once as DoRA runs it (‖W‖² taken then), and as a one-shot call (‖W‖² each time).
        using (var prepared = WithKernels(true, true, () => LoraWeightNorms.prepare_grouped_low_rank_row_norms(items)))
        {
            var gemm = Time(() => Assert.True(prepared!.Run()));
            lines.Add($"grouped-bench gemm prepared chunks=4 us_per_step={gemm.gpu:F0} host_us={gemm.host:F0}");
        }
        var once = WithKernels(true, true, () => Time(() => Assert.True(LoraWeightNorms.grouped_low_rank_row_norms(items))));
        lines.Add($"grouped-bench gemm one-shot us_per_step={once.gpu:F0} host_us={once.host:F0}");
        // Written before the GEMM path's norms are checked: its time is reported even where they fail.
        File.AppendAllLines(file, lines);
        for (var i = 0; i < items.Count; i++)
            Assert.True(MaxRelative(items[i].Norm, single[i]) < 1e-5, $"GEMM path, item {i}: grouped vs per-projection {MaxRelative(items[i].Norm, single[i])}");
    }

    [Fact]
    public void Training_computes_each_steps_norms_in_one_grouped_launch()
    {
        var (fusedNorm, grouped, beside, gemm) = (Fused.DoraNorm, LoraWeightNorms.GroupedNorms, LoraWeightNorms.GroupedBeside, LoraWeightNorms.GroupedGemm);
        Fused.DoraNorm = true;
        try
        {
            LoraWeightNorms.GroupedNorms = true;
            LoraWeightNorms.GroupedBeside = false;
            LoraWeightNorms.GroupedGemm = false;
            var (groupedLosses, counts) = Train();
            // 2 layers × 7 projections; each step: one FMA launch (one dtype combination), 14 items, no per-projection launch.
            Assert.Equal(Cuda ? (3L, 3L * 14, 0L) : (0L, 0L, 0L), counts);
            // Split: the first 2 members' norms on libtorch's stream, the other 12 on the side stream; the same kernel, so
            // the same losses bit for bit.
            LoraWeightNorms.GroupedBeside = true;
            var (besideLosses, besideCounts) = Train();
            Assert.Equal(Cuda ? (6L, 3L * 14, 0L) : (0L, 0L, 0L), besideCounts);
            Assert.Equal(groupedLosses, besideLosses);
            // The GEMM path: every item, no FMA launch.
            (LoraWeightNorms.GroupedBeside, LoraWeightNorms.GroupedGemm) = (false, true);
            var gemmItems = LoraWeightNorms.GroupedGemmItems;
            var (gemmLosses, gemmCounts) = Train();
            Assert.Equal(Cuda ? (0L, 3L * 14, 0L) : (0L, 0L, 0L), gemmCounts);
            // The three steps and the row-scale check after them (Train's step 3).
            Assert.Equal(Cuda ? 4L * 14 : 0L, LoraWeightNorms.GroupedGemmItems - gemmItems);
            // The GEMM path split as above: the first members' GEMMs on libtorch's stream, the others' on the side stream
            // (cuBLAS there on a handle of its own).
            LoraWeightNorms.GroupedBeside = true;
            var besideGemmItems = LoraWeightNorms.GroupedGemmItems;
            var (besideGemmLosses, besideGemmCounts) = Train();
            Assert.Equal(Cuda ? (0L, 3L * 14, 0L) : (0L, 0L, 0L), besideGemmCounts);
            Assert.Equal(Cuda ? 4L * 14 : 0L, LoraWeightNorms.GroupedGemmItems - besideGemmItems);
            LoraWeightNorms.GroupedBeside = false;
            LoraWeightNorms.GroupedNorms = false;
            var (singleLosses, none) = Train();
            Assert.Equal(0L, none.launches);
            for (var i = 0; i < groupedLosses.Count; i++)
            {
                Assert.True(Math.Abs(groupedLosses[i] - singleLosses[i]) <= 1e-3 * Math.Abs(singleLosses[i]),
                    $"step {i}: grouped {groupedLosses[i]}, per projection {singleLosses[i]}");
                Assert.True(Math.Abs(gemmLosses[i] - singleLosses[i]) <= 1e-3 * Math.Abs(singleLosses[i]),
                    $"step {i}: GEMM path {gemmLosses[i]}, per projection {singleLosses[i]}");
                Assert.True(Math.Abs(besideGemmLosses[i] - singleLosses[i]) <= 1e-3 * Math.Abs(singleLosses[i]),
                    $"step {i}: GEMM path beside, {besideGemmLosses[i]}, per projection {singleLosses[i]}");
            }
        }
        finally
        {
            (Fused.DoraNorm, LoraWeightNorms.GroupedNorms, LoraWeightNorms.GroupedBeside, LoraWeightNorms.GroupedGemm) = (fusedNorm, grouped, beside, gemm);
        }
    }

    [Fact]
    public void The_prepared_launch_is_rebuilt_when_a_member_changes()
    {
        var config = new LlamaConfig
        {
            HiddenSize = 64, IntermediateSize = 96, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
            VocabSize = 64, TieWordEmbeddings = true, RopeTheta = 10000, MaxPositionEmbeddings = 64,
        };
        using var model = LlamaForCausalLM.CreateRandom(config, Cuda ? ScalarType.BFloat16 : ScalarType.Float32, Dev, seed: 2);
        torchx.manual_seed(7);
        using var adapter = (LoraAdapter)new DoraMethod().Attach(model, new DoraOptions
        {
            R = 8, LoraAlpha = 16, TargetModules = new[] { "q_proj", "v_proj", "down_proj" }, InitLoraWeights = LoraInit.Random,
        });
        model.train();
        var layers = adapter.Layers.Values.ToList();
        // The row scales the fused blocks take, in a step, against m/‖V‖ of the weights as they are.
        void Check(long step, string when)
        {
            adapter.OnStepBegin(step);
            foreach (var layer in layers)
            {
                var (c, _, _) = layer.low_rank_parts(out _)!.DividedRowScale!();
                var expected = Dora.Magnitude(layer).to(ScalarType.Float64)
                    .div(Definition(layer.base_linear.dense_weight(), layer.A("default"), layer.B("default"), layer.Scaling("default")));
                Assert.True(MaxRelative(c, expected) < 1e-5, $"{when}: {MaxRelative(c, expected)} off m/‖V‖ (a stale norm?)");
            }
            adapter.OnStepEnd(step);
        }
        var items = LoraWeightNorms.GroupedNormItems;
        Check(0, "first step");                                         // prepares the launch
        using (torch.no_grad()) foreach (var layer in layers) layer.B("default").mul_(-1.5);  // values: the prepared launch reads them
        Check(1, "B changed between steps");                            // runs it again
        layers[1].SetScaling("default", 3.0, useRslora: false);         // a member's key changes: prepared anew
        Check(2, "a new scaling");
        using (torch.no_grad()) layers[0].MarkWeightsChanged();
        Check(3, "an announced write");
        // A write to a base weight through its layer: prepared anew (the GEMM path's ‖W‖² is taken when prepared).
        using (torch.no_grad()) layers[2].AddToBaseWeight(torch.full_like(layers[2].base_linear.dense_weight(), 0.01));
        Check(4, "a base weight write");
        Assert.Equal(Cuda ? 5L * layers.Count : 0L, LoraWeightNorms.GroupedNormItems - items);
    }

    // Three steps of a 2-layer Llama (bf16 on CUDA) with DoRA on all seven projections, fused blocks and checkpointing; the
    // grouped launches and items, and the per-projection kernel launches, during the steps.
    private static (List<double> losses, (long launches, long items, long single) counts) Train()
    {
        using var run = new TinyDoraLlama();
        var (model, adapter) = (run.Model, run.Adapter);
        var before = (LoraWeightNorms.GroupedNormLaunches, LoraWeightNorms.GroupedNormItems, LoraWeightNorms.LowRankNormLaunches);
        var losses = run.Train(3);
        var counts = (LoraWeightNorms.GroupedNormLaunches - before.Item1, LoraWeightNorms.GroupedNormItems - before.Item2,
            LoraWeightNorms.LowRankNormLaunches - before.Item3);
        Assert.Equal("qkv: fused n=2 [0-1]; mlp: fused n=2 [0-1]; o_proj: fused n=2 [0-1]", LoraFusionPaths.Report(model.named_modules()));
        // After the optimizer steps: each projection's row scale as the fused blocks get it (DividedRowScale: the kernel's c
        // where the group computed it, m, ‖V‖) and as RowScale (m.div(norm) under autograd), against m/‖V‖ of the new weights.
        adapter.OnStepBegin(3);
        foreach (var (name, layer) in adapter.Layers)
        {
            var parts = layer.low_rank_parts(out var reason);
            Assert.True(parts?.DividedRowScale is not null && parts.RowScale is not null, $"{name}: no row scale: {reason}");
            var expected = Dora.Magnitude(layer).to(ScalarType.Float64)
                .div(Definition(layer.base_linear.dense_weight(), layer.A("default"), layer.B("default"), layer.Scaling("default")));
            var withGrad = parts!.RowScale!();
            Assert.True(withGrad.requires_grad, $"{name}: c does not carry m's gradient");
            var (c, m, n) = parts.DividedRowScale!();
            Assert.Same(Dora.Magnitude(layer), m);
            Assert.True(MaxRelative(withGrad.detach(), expected) < 1e-5, $"{name}: a stale or inexact norm");
            Assert.True(c.eq(withGrad.detach()).all().item<bool>(), $"{name}: the fused blocks' c differs from m.div(norm)");
            Assert.True(c.eq(m.div(n)).all().item<bool>(), $"{name}: c is not m/divisor");
        }
        adapter.OnStepEnd(3);
        return (losses, counts);
    }
}
