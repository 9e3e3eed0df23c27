using LoRAHub.TorchExtensions.Modules;
using TorchSharp.Modules;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// The fused LoRA blocks (<see cref="LoraFusion"/>): forward outputs and every gradient (x, and A and B of each
/// projection) against the composite ops that LoRA's layer and Llama's MLP run, fp32 tight and bf16 loose, on the test
/// device (CUDA when LORAHUB_TEST_DEVICE=cuda, where the SwiGLU kernel runs inside both); and the refusals, each with
/// the reason recorded for the block. With 4-bit (NF4) bases too, dequantized inside the fused block, and with per-output-row
/// scales (DoRA's m/‖V‖: y = c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b), whose gradients are compared too.
/// </summary>
[Collection(KernelTestsCollection.Name)] // counts LoraFusion's blocks and the kernels' launches, flips LoraRowScaleKernels.Enabled (process-wide)
public class LoraFusionTests
{
    private static readonly Device Dev = TestDevice.Current;
    private const long Hidden = 16, Inter = 24;

    /// <summary>A frozen Linear with an optional low-rank update, computed as LoRA's layer does (update in the input's dtype, one addmm).</summary>
    private sealed class LowRank : nn.Module<Tensor, Tensor>, ILowRankLinear
    {
        private readonly Linear linear;
        private readonly Linear4bit? fourBit; // the base in NF4 instead of linear, when asked
        private readonly Parameter? a, b;
        private readonly Parameter? c; // a trainable per-output-row scale (DoRA's m/‖V‖ shape), when asked
        private readonly double scale;
        public string? Refusal;
        public Func<Tensor>? RowScaleOverride; // what the parts offer as the row scale instead of c (bad-input tests)

        public LowRank(long inF, long outF, int rank, bool bias, ScalarType dtype, Generator gen, bool quantized = false, bool rowScale = false)
            : base(nameof(LowRank))
        {
            // Everything made on the test device (no module.to: the fields below must stay the module's tensors).
            linear = nn.Linear(inF, outF, hasBias: bias, device: Dev, dtype: dtype);
            using (no_grad())
            {
                linear.weight!.copy_(randn([outF, inF], generator: gen) / Math.Sqrt(inF));
                linear.bias?.copy_(randn([outF], generator: gen) * 0.1);
            }
            linear.weight!.requires_grad = false;
            if (linear.bias is { } bb) bb.requires_grad = false;
            if (rank > 0)
            {
                // fp32 master weights, as the LoRA layer keeps them; B non-zero so every gradient path carries signal.
                a = new Parameter((randn([rank, inF], generator: gen) / Math.Sqrt(inF)).to(Dev));
                b = new Parameter((randn([outF, rank], generator: gen) * 0.3).to(Dev));
                scale = 2.0 / rank;
            }
            // fp32, away from 1 on both sides, as DoRA's m/‖V‖ after some training.
            if (rowScale) c = new Parameter((rand([outF], generator: gen) + 0.5).to(Dev));
            if (quantized)
            {
                fourBit = Linear4bit.FromLinear(LinearLayer.From(linear)!, Dev, "nf4", 64, double_quant: false, compute_dtype: dtype);
                fourBit.bias?.requires_grad_(false);
            }
            RegisterComponents();
        }

        public Parameter? A => a;
        public Parameter? B => b;

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            // With a row scale: y = c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b, the product in fp32 and rounded once.
            var y = fourBit is null ? c is null ? linear.call(x) : nn.functional.linear(x, linear.weight!) : fourBit.call(x);
            if (a is not null)
            {
                var xa = nn.functional.linear(x, a.to(x.dtype));
                y = torchx.addmm(y.reshape(-1, y.size(-1)), xa.reshape(-1, xa.size(-1)), b!.to(x.dtype).t(), 1, scale).view(y.shape);
            }
            if (c is not null)
            {
                y = y.to(ScalarType.Float32).mul(c).to(x.dtype);
                if (linear.bias is { } bias && fourBit is null) y = y.add(bias);
            }
            return y.MoveToOuterDisposeScope();
        }

        public LowRankParts? low_rank_parts(out string reason)
        {
            reason = Refusal ?? "";
            if (Refusal is not null) return null;
            var parts = fourBit is null ? new LowRankParts(linear.weight!, linear.bias, a, b, scale) : LowRankParts.FromComputedWeight(fourBit, fourBit.bias, a, b, scale);
            return RowScaleOverride is not null ? parts with { RowScale = RowScaleOverride } : c is null ? parts : parts with { RowScale = () => c };
        }

        public IEnumerable<Parameter> Trainable() => new[] { a, b, c }.OfType<Parameter>();
    }

    private sealed class Block() : nn.Module("block");

    private static Tensor CompositeMlp(string activation, LowRank gate, LowRank up, LowRank down, Tensor x)
    {
        var g = gate.call(x);
        var u = up.call(x);
        var h = activation switch
        {
            "silu" => torchx.nn.functional.swiglu(g, u),
            "gelu" => nn.functional.gelu(g) * u,
            _ => nn.functional.gelu(g, GELU.Approximate.tanh) * u,
        };
        return down.call(h);
    }

    private static (double rtol, double atol) Tolerance(ScalarType dtype) => dtype == ScalarType.Float32 ? (2e-5, 2e-5) : (3e-2, 3e-2);

    // Runs f twice (fused, composite) on the same x and upstream gradient; compares outputs and the gradients of x and of
    // every trainable tensor.
    private static void AssertSameAsComposite(ScalarType dtype, bool xNeedsGrad, IReadOnlyList<Parameter> trainable,
        Func<Tensor, Tensor[]?> fused, Func<Tensor, Tensor[]> composite, Generator gen, nn.Module block)
    {
        var x0 = (randn([2, 5, Hidden], generator: gen)).to(dtype).to(Dev);
        var results = new List<(Tensor[] outputs, Tensor? dx, Tensor[] grads)>();
        Tensor[]? upstream = null;
        foreach (var run in new[] { fused, composite })
        {
            foreach (var p in trainable) p.grad = null;
            var x = x0.detach().clone().requires_grad_(xNeedsGrad);
            var outputs = run(x);
            Assert.True(outputs is not null, $"not fused: {LoraFusionPaths.Of(block)}");
            upstream ??= outputs!.Select(o => randn(o.shape, generator: gen).to(dtype).to(Dev)).ToArray();
            var loss = outputs!.Zip(upstream, (o, d) => (o.to(ScalarType.Float32) * d.to(ScalarType.Float32)).sum()).Aggregate((l, r) => l + r);
            loss.backward();
            results.Add((outputs.Select(o => o.detach()).ToArray(), xNeedsGrad ? x.grad!.detach().clone() : null,
                trainable.Select(p => p.grad!.detach().clone()).ToArray()));
        }
        var (rtol, atol) = Tolerance(dtype);
        var (f, c) = (results[0], results[1]);
        for (var i = 0; i < f.outputs.Length; i++) FusedKernelTests.AssertClose(f.outputs[i], c.outputs[i], rtol, atol, $"output {i}");
        if (xNeedsGrad) FusedKernelTests.AssertClose(f.dx!, c.dx!, rtol, atol, "dx");
        for (var i = 0; i < trainable.Count; i++)
        {
            Assert.Equal(trainable[i].dtype, f.grads[i].dtype);
            FusedKernelTests.AssertClose(f.grads[i], c.grads[i], rtol, atol, $"gradient of trainable tensor {i}");
        }
    }

    [Theory]
    [InlineData(ScalarType.Float32, "silu", "all", true, false)]
    [InlineData(ScalarType.Float32, "silu", "gate", true, false)]
    [InlineData(ScalarType.Float32, "silu", "updown", false, false)]
    [InlineData(ScalarType.Float32, "gelu_pytorch_tanh", "all", true, false)]
    [InlineData(ScalarType.Float32, "gelu", "all", true, false)]
    [InlineData(ScalarType.BFloat16, "silu", "all", true, false)]
    [InlineData(ScalarType.BFloat16, "gelu_pytorch_tanh", "gate", true, false)]
    [InlineData(ScalarType.Float32, "silu", "all", true, true)]
    [InlineData(ScalarType.BFloat16, "silu", "all", true, true)]
    public void Mlp_matches_the_composite_path(ScalarType dtype, string activation, string adapted, bool xNeedsGrad, bool fourBit)
    {
        var gen = new Generator(7);
        int Rank(string proj, int r) => adapted == "all" || adapted.Contains(proj) ? r : 0;
        // Different ranks, so a wrong offset into the stacked [A_gate; A_up] cannot pass.
        using var gate = new LowRank(Hidden, Inter, Rank("gate", 4), false, dtype, gen, fourBit);
        using var up = new LowRank(Hidden, Inter, Rank("up", 2), false, dtype, gen, fourBit);
        using var down = new LowRank(Inter, Hidden, Rank("down", 3), false, dtype, gen, fourBit);
        var trainable = gate.Trainable().Concat(up.Trainable()).Concat(down.Trainable()).ToList();
        var block = new Block();
        var before = LoraFusion.MlpCount;
        AssertSameAsComposite(dtype, xNeedsGrad, trainable,
            x => LoraFusion.TryMlp(block, activation, gate, up, down, x, fused: true) is { } y ? [y] : null,
            x => [CompositeMlp(activation, gate, up, down, x)], gen, block);
        Assert.Equal(before + 1, LoraFusion.MlpCount);
        Assert.Equal("fused", LoraFusionPaths.Of(block));
    }

    [Theory]
    [InlineData(ScalarType.Float32, false, false)]
    [InlineData(ScalarType.Float32, true, true)]
    [InlineData(ScalarType.BFloat16, true, false)]
    public void A_single_projection_matches_the_composite_path(ScalarType dtype, bool bias, bool rowScale)
    {
        var gen = new Generator(13);
        using var o = new LowRank(Hidden, 12, 4, bias, dtype, gen, rowScale: rowScale);
        var before = LoraFusion.ProjectionCount;
        AssertSameAsComposite(dtype, true, o.Trainable().ToList(),
            x => LoraFusion.TryProjection(o, "o_proj", x, fused: true) is { } y ? [y] : null,
            x => [o.call(x)], gen, o);
        Assert.Equal(before + 1, LoraFusion.ProjectionCount);
        Assert.Equal("fused", LoraFusionPaths.Of(o));
        // Without an update there is nothing to fuse: the module runs as it is.
        using var plain = new LowRank(Hidden, 12, 0, bias, dtype, gen);
        Assert.Null(LoraFusion.TryProjection(plain, "o_proj", randn([2, 3, Hidden]).to(dtype).to(Dev), fused: true));
        Assert.Equal("composite (no adapter)", LoraFusionPaths.Of(plain));
    }

    [Theory]
    [InlineData(ScalarType.Float32, false, true, false)]
    [InlineData(ScalarType.Float32, true, true, false)]
    [InlineData(ScalarType.Float32, true, false, false)]
    [InlineData(ScalarType.BFloat16, true, true, false)]
    [InlineData(ScalarType.Float32, false, true, true)]
    public void Qkv_matches_the_composite_path(ScalarType dtype, bool bias, bool xNeedsGrad, bool fourBit)
    {
        var gen = new Generator(11);
        // Grouped-query shapes (k, v narrower than q); k without an update.
        using var q = new LowRank(Hidden, 16, 4, bias, dtype, gen, fourBit);
        using var k = new LowRank(Hidden, 8, 0, bias, dtype, gen, fourBit);
        using var v = new LowRank(Hidden, 8, 3, bias, dtype, gen);
        var trainable = q.Trainable().Concat(v.Trainable()).ToList();
        var block = new Block();
        var before = LoraFusion.QkvCount;
        AssertSameAsComposite(dtype, xNeedsGrad, trainable,
            x => LoraFusion.TryQkv(block, q, k, v, x, fused: true) is var (a, b, c) ? [a, b, c] : null,
            x => [q.call(x), k.call(x), v.call(x)], gen, block);
        Assert.Equal(before + 1, LoraFusion.QkvCount);
    }

    [Theory]
    [InlineData(ScalarType.Float32, false, true)]
    [InlineData(ScalarType.BFloat16, false, true)]
    [InlineData(ScalarType.Float32, true, true)]
    [InlineData(ScalarType.BFloat16, false, false)]
    [InlineData(ScalarType.Float32, true, false)]
    public void Mlp_with_row_scales_matches_the_composite_path(ScalarType dtype, bool fourBit, bool scaledKernel)
    {
        // On CUDA the scales are applied inside the row-scale kernels, or (switched off) by in-place tensor ops.
        var (enabled, launches) = (LoraRowScaleKernels.Enabled, LoraRowScaleKernels.Launches);
        LoraRowScaleKernels.Enabled = scaledKernel;
        try
        {
            MlpWithRowScales(dtype, fourBit);
        }
        finally
        {
            LoraRowScaleKernels.Enabled = enabled;
        }
        Assert.Null(LoraRowScaleKernels.CompileFailure);
        // SwiGLU forward, SwiGLU backward (which also gives h for A_down's gradient) and down's row-scale backward: three
        // calls on CUDA; none elsewhere.
        Assert.Equal(launches + (TestDevice.IsCuda && scaledKernel ? 3 : 0), LoraRowScaleKernels.Launches);
    }

    private static void MlpWithRowScales(ScalarType dtype, bool fourBit)
    {
        var gen = new Generator(17);
        // Scaled gate and down; up plain (a block may mix them); trainable scales get their gradient Σ dy ⊙ inner.
        using var gate = new LowRank(Hidden, Inter, 4, false, dtype, gen, fourBit, rowScale: true);
        using var up = new LowRank(Hidden, Inter, 2, false, dtype, gen, fourBit);
        using var down = new LowRank(Inter, Hidden, 3, false, dtype, gen, fourBit, rowScale: true);
        var trainable = gate.Trainable().Concat(up.Trainable()).Concat(down.Trainable()).ToList();
        Assert.Equal(8, trainable.Count);
        var block = new Block();
        AssertSameAsComposite(dtype, true, trainable,
            x => LoraFusion.TryMlp(block, "silu", gate, up, down, x, fused: true) is { } y ? [y] : null,
            x => [CompositeMlp("silu", gate, up, down, x)], gen, block);
        Assert.Equal("fused", LoraFusionPaths.Of(block));
    }

    [Theory]
    [InlineData(ScalarType.Float32, true, true)]
    [InlineData(ScalarType.BFloat16, true, true)]
    [InlineData(ScalarType.Float32, false, true)]
    [InlineData(ScalarType.BFloat16, true, false)]
    public void Qkv_with_row_scales_matches_the_composite_path(ScalarType dtype, bool bias, bool rowScaleKernel)
    {
        var (enabled, launches) = (LoraRowScaleKernels.Enabled, LoraRowScaleKernels.Launches);
        LoraRowScaleKernels.Enabled = rowScaleKernel;
        try
        {
            QkvWithRowScales(dtype, bias);
        }
        finally
        {
            LoraRowScaleKernels.Enabled = enabled;
        }
        Assert.Null(LoraRowScaleKernels.CompileFailure);
        // The row-scale backward of q and of v on CUDA (one pass over the stacked gradients where the bases are stacked);
        // none elsewhere.
        var expected = !TestDevice.IsCuda || !rowScaleKernel ? 0 : StackedBases.RowScaled ? 1 : 2;
        Assert.Equal(launches + expected, LoraRowScaleKernels.Launches);
    }

    private static void QkvWithRowScales(ScalarType dtype, bool bias)
    {
        var gen = new Generator(19);
        // q and v scaled (q with a bias when asked: it is added after the scale), k without update or scale.
        using var q = new LowRank(Hidden, 16, 4, bias, dtype, gen, rowScale: true);
        using var k = new LowRank(Hidden, 8, 0, bias, dtype, gen);
        using var v = new LowRank(Hidden, 8, 3, false, dtype, gen, rowScale: true);
        var trainable = q.Trainable().Concat(v.Trainable()).ToList();
        var block = new Block();
        AssertSameAsComposite(dtype, true, trainable,
            x => LoraFusion.TryQkv(block, q, k, v, x, fused: true) is var (a, b, c) ? [a, b, c] : null,
            x => [q.call(x), k.call(x), v.call(x)], gen, block);
    }

    [Theory]
    [InlineData(ScalarType.Float32, 48)]
    [InlineData(ScalarType.BFloat16, 48)]
    [InlineData(ScalarType.BFloat16, 37)]
    [InlineData(ScalarType.Float16, 1000)]
    public void Row_norms_squared_match_the_tensor_ops_on_cuda_and_are_left_to_them_elsewhere(ScalarType dtype, long cols)
    {
        var gen = new Generator(29);
        using var w = randn([24, cols], generator: gen).to(dtype).to(Dev);
        using var fast = LoraWeightNorms.row_norms_squared(w);
        if (!TestDevice.IsCuda)
        {
            Assert.Null(fast);
            return;
        }
        Assert.Null(LoraRowScaleKernels.CompileFailure);
        Assert.NotNull(fast);
        Assert.Equal(ScalarType.Float32, fast!.dtype);
        using var expected = w.to(ScalarType.Float64).square().sum(dim: 1);
        FusedKernelTests.AssertClose(fast, expected.to(ScalarType.Float32), 1e-5, 1e-6, "row norms squared");
    }

    [Fact]
    public void A_row_scale_that_does_not_fit_takes_the_composite_path_and_says_why()
    {
        var gen = new Generator(23);
        using var q = new LowRank(Hidden, 16, 4, false, ScalarType.Float32, gen, rowScale: true);
        using var k = new LowRank(Hidden, 8, 2, false, ScalarType.Float32, gen);
        using var v = new LowRank(Hidden, 8, 2, false, ScalarType.Float32, gen);
        using var x = randn([1, 3, Hidden], generator: gen).to(Dev);
        var block = new Block();
        var before = LoraFusion.QkvCount;
        q.RowScaleOverride = () => ones([8], device: Dev);
        Assert.Null(LoraFusion.TryQkv(block, q, k, v, x, fused: true));
        Assert.Equal("composite (q_proj: row scale of shape [8] for 16 outputs)", LoraFusionPaths.Of(block));
        q.RowScaleOverride = () => ones([16], ScalarType.Int32, Dev);
        Assert.Null(LoraFusion.TryQkv(block, q, k, v, x, fused: true));
        Assert.Equal("composite (q_proj: row scale is not floating point)", LoraFusionPaths.Of(block));
        Assert.Equal(before, LoraFusion.QkvCount);
        q.RowScaleOverride = null;
        Assert.NotNull(LoraFusion.TryQkv(block, q, k, v, x, fused: true));
        Assert.Equal(before + 1, LoraFusion.QkvCount);
    }

    [Fact]
    public void Blocks_that_are_not_exact_take_the_composite_path_and_say_why()
    {
        var gen = new Generator(3);
        using var q = new LowRank(Hidden, 16, 4, false, ScalarType.Float32, gen);
        using var k = new LowRank(Hidden, 8, 2, false, ScalarType.Float32, gen);
        using var v = new LowRank(Hidden, 8, 2, false, ScalarType.Float32, gen);
        using var plain = new LowRank(Hidden, 8, 0, false, ScalarType.Float32, gen);
        using var x = randn([1, 3, Hidden], generator: gen).to(Dev);
        var block = new Block();
        var before = LoraFusion.QkvCount;

        Assert.Null(LoraFusion.TryQkv(block, q, k, v, x, fused: false));
        Assert.Equal("composite (lora_qkv off)", LoraFusionPaths.Of(block));

        k.Refusal = "dropout 0.05";
        Assert.Null(LoraFusion.TryQkv(block, q, k, v, x, fused: true));
        Assert.Equal("composite (k_proj: dropout 0.05)", LoraFusionPaths.Of(block));
        k.Refusal = null;

        using (var bf16 = x.to(ScalarType.BFloat16))
            Assert.Null(LoraFusion.TryQkv(block, q, k, v, bf16, fused: true));
        Assert.StartsWith("composite (q_proj: weight Float32, input BFloat16", LoraFusionPaths.Of(block));

        Assert.Null(LoraFusion.TryQkv(block, plain, plain, plain, x, fused: true));
        Assert.Equal("composite (no adapter)", LoraFusionPaths.Of(block));

        // A trainable base (full fine-tuning) is not fused: its weight gradient is not computed there.
        using var trainableBase = nn.Linear(Hidden, 8, hasBias: false, device: Dev);
        Assert.Null(LoraFusion.TryQkv(block, q, trainableBase, v, x, fused: true));
        Assert.Equal("composite (k_proj: trainable base)", LoraFusionPaths.Of(block));

        var mlp = new Block();
        using var up = new LowRank(Hidden, 16, 2, false, ScalarType.Float32, gen);
        using var down = new LowRank(16, Hidden, 2, false, ScalarType.Float32, gen);
        Assert.Null(LoraFusion.TryMlp(mlp, "relu", q, up, down, x, fused: true));
        Assert.Equal("composite (activation relu)", LoraFusionPaths.Of(mlp));
        Assert.Equal(before, LoraFusion.QkvCount);
    }

    [Fact]
    public void The_path_report_groups_blocks_by_path_and_lists_their_layers()
    {
        var blocks = Enumerable.Range(0, 4).Select(_ => new Block()).ToArray();
        var attn = new Block();
        for (var i = 0; i < 4; i++) LoraFusionPaths.Record(blocks[i], "mlp", i == 2 ? "up_proj: 2 active adapters" : null);
        LoraFusionPaths.Record(attn, "qkv", null);
        var named = blocks.Select((b, i) => ($"model.layers.{i}.mlp", (nn.Module)b)).Append(("model.layers.0.self_attn", attn)).Append(("lm_head", new Block()));
        Assert.Equal("mlp: fused n=3 [0-1,3], composite (up_proj: 2 active adapters) n=1 [2]; qkv: fused n=1 [0]", LoraFusionPaths.Report(named));
    }
}
