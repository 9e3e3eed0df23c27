using LoRAHub.Models.Llama;

namespace LoRAHub.DoRA.Tests;

/// <summary>
/// DoRA in the fused LoRA blocks (issue 19 item 1): with the norm detached, DoRA's layer offers its parts with the row
/// scale c = m/‖V‖, and the fused MLP and q/k/v functions give the composite DoRA layers' outputs and the gradients of x,
/// A, B and m (fp32 tight, bf16 loose; a bias and a plain LoRA projection mixed in); inside Llama the blocks are taken
/// (counters, path report) with the composite loss and gradients, with and without checkpointing, and a few training steps
/// give the same losses; a 4-bit base is dequantized inside; a norm that is not detached or dropout in training keeps the
/// composite path, with the reason.
/// On the test device (LORAHUB_TEST_DEVICE).
/// </summary>
public class FusedDoraBlockTests
{
    private static readonly Device Dev = torch.device(Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") ?? "cpu");

    private static readonly string[] Targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    private static T WithFused<T>(bool on, Func<T> f) => FusedBlocks.WithFused(on, f);

    private static void AssertClose(Tensor actual, Tensor expected, double tol, string what)
    {
        Assert.Equal(expected.shape, actual.shape);
        var e = expected.to(ScalarType.Float64);
        var scale = e.abs().max().ToDouble();
        var diff = (actual.to(ScalarType.Float64) - e).abs().max().ToDouble();
        Assert.True(diff <= tol * Math.Max(scale, 1e-6), $"{what}: max difference {diff}, scale {scale}");
    }

    /// <summary>A LoRA layer on a frozen Linear (base in <paramref name="dtype"/>, fp32 adapter masters), DoRA unless told, m perturbed so c ≠ 1.</summary>
    private static LoraLinear Layer(long inF, long outF, bool bias, ScalarType dtype, bool dora = true)
    {
        var linear = nn.Linear(inF, outF, hasBias: bias, device: Dev, dtype: dtype);
        linear.weight!.requires_grad = false;
        if (linear.bias is { } b) b.requires_grad = false;
        var layer = new LoraLinear(linear);
        layer.UpdateLayer("default", 4, 8, 0, false, LoraInit.Random, ScalarType.Float32, variant: dora ? new DoraVariant(new DoraOptions()) : null);
        layer.ActiveAdapters = ["default"];
        layer.train();
        if (dora)
        {
            var m = DoraVariant.Layer(layer, "default").weight;
            using var _ = no_grad();
            m.mul_(rand(m.shape, m.dtype, m.device).add(0.5));
        }
        return layer;
    }

    private static IEnumerable<Tensor> Trainable(LoraLinear layer)
    {
        yield return layer.A("default");
        yield return layer.B("default");
        if (layer.Variant("default") is not null) yield return DoraVariant.Layer(layer, "default").weight;
    }

    // Outputs and the gradients of x and of every trainable tensor for Σ_o Σ o·w_o with fixed random weights w_o.
    private static (Tensor[] outs, Tensor[] grads) Run(Tensor x0, IReadOnlyList<Tensor> trainable, Func<Tensor, Tensor[]> f)
    {
        foreach (var p in trainable) p.grad = null;
        var x = x0.detach().clone().requires_grad_();
        var outs = f(x);
        using var gen = new Generator(11);
        var loss = outs.Select(o => o.to(ScalarType.Float32).mul(randn(o.shape, generator: gen).to(Dev)).sum()).Aggregate((a, b) => a + b);
        loss.backward();
        return (outs.Select(o => o.detach()).ToArray(), new[] { x.grad! }.Concat(trainable.Select(p => p.grad!.clone())).ToArray());
    }

    [Theory]
    [InlineData(ScalarType.Float32, 2e-5)]
    [InlineData(ScalarType.BFloat16, 3e-2)]
    public void Fused_mlp_with_dora_gives_the_composite_outputs_and_gradients(ScalarType dtype, double tol)
    {
        torchx.manual_seed(21);
        // gate: DoRA with a bias; up: plain LoRA; down: DoRA.
        using var gate = Layer(16, 24, bias: true, dtype);
        using var up = Layer(16, 24, bias: false, dtype, dora: false);
        using var down = Layer(24, 16, bias: false, dtype);
        var trainable = new[] { gate, up, down }.SelectMany(Trainable).ToList();
        Assert.Equal(8, trainable.Count);
        using var x0 = randn([2, 5, 16], ScalarType.Float32, Dev).to(dtype);
        var block = nn.Identity();
        var before = LoraFusion.MlpCount;
        var fused = Run(x0, trainable, x => [LoraFusion.TryMlp(block, "silu", gate, up, down, x, fused: true)
            ?? throw new Xunit.Sdk.XunitException(LoraFusionPaths.Of(block))]);
        Assert.Equal(before + 1, LoraFusion.MlpCount);
        Assert.Equal("fused", LoraFusionPaths.Of(block));
        var composite = Run(x0, trainable, x => [down.call(nn.functional.silu(gate.call(x)).mul(up.call(x)))]);
        AssertClose(fused.outs[0], composite.outs[0], tol, "output");
        string[] names = ["x", "gate A", "gate B", "gate m", "up A", "up B", "down A", "down B", "down m"];
        for (var i = 0; i < names.Length; i++) AssertClose(fused.grads[i], composite.grads[i], tol, $"gradient of {names[i]}");
    }

    [Theory]
    [InlineData(ScalarType.Float32, 2e-5)]
    [InlineData(ScalarType.BFloat16, 3e-2)]
    public void Fused_qkv_with_dora_gives_the_composite_outputs_and_gradients(ScalarType dtype, double tol)
    {
        torchx.manual_seed(22);
        // q: DoRA with a bias; k: plain LoRA; v: DoRA.
        using var q = Layer(16, 16, bias: true, dtype);
        using var k = Layer(16, 8, bias: false, dtype, dora: false);
        using var v = Layer(16, 8, bias: false, dtype);
        var trainable = new[] { q, k, v }.SelectMany(Trainable).ToList();
        using var x0 = randn([3, 4, 16], ScalarType.Float32, Dev).to(dtype);
        var block = nn.Identity();
        var before = LoraFusion.QkvCount;
        var fused = Run(x0, trainable, x => LoraFusion.TryQkv(block, q, k, v, x, fused: true) is var (a, b, c)
            ? [a, b, c] : throw new Xunit.Sdk.XunitException(LoraFusionPaths.Of(block)));
        Assert.Equal(before + 1, LoraFusion.QkvCount);
        var composite = Run(x0, trainable, x => [q.call(x), k.call(x), v.call(x)]);
        for (var i = 0; i < 3; i++) AssertClose(fused.outs[i], composite.outs[i], tol, $"output {i}");
        string[] names = ["x", "q A", "q B", "q m", "k A", "k B", "v A", "v B", "v m"];
        for (var i = 0; i < names.Length; i++) AssertClose(fused.grads[i], composite.grads[i], tol, $"gradient of {names[i]}");
    }

    [Fact]
    public void Fused_qkv_with_dora_on_a_4bit_base_gives_the_composite_outputs_and_gradients()
    {
        torchx.manual_seed(24);
        LoraLinear Quantized(long outF)
        {
            using var dense = nn.Linear(32, outF, hasBias: false);
            var q = LoRAHub.TorchExtensions.Modules.Linear4bit.FromLinear(LinearLayer.From(dense)!, Dev, "nf4", 64, double_quant: true,
                compute_dtype: ScalarType.Float32);
            var layer = new LoraLinear(q);
            layer.UpdateLayer("default", 4, 8, 0, false, LoraInit.Random, ScalarType.Float32, variant: new DoraVariant(new DoraOptions()));
            layer.ActiveAdapters = ["default"];
            var m = DoraVariant.Layer(layer, "default").weight;
            using var _ = no_grad();
            m.mul_(rand(m.shape, m.dtype, m.device).add(0.5));
            return layer;
        }
        using var q = Quantized(32);
        using var k = Quantized(16);
        using var v = Quantized(16);
        Assert.True(q.low_rank_parts(out _) is { Weight: null, Dequantize: not null, HasRowScale: true });
        var trainable = new[] { q, k, v }.SelectMany(Trainable).ToList();
        using var x0 = randn([2, 3, 32], ScalarType.Float32, Dev);
        var block = nn.Identity();
        var fused = Run(x0, trainable, x => LoraFusion.TryQkv(block, q, k, v, x, fused: true) is var (a, b, c)
            ? [a, b, c] : throw new Xunit.Sdk.XunitException(LoraFusionPaths.Of(block)));
        var composite = Run(x0, trainable, x => [q.call(x), k.call(x), v.call(x)]);
        for (var i = 0; i < 3; i++) AssertClose(fused.outs[i], composite.outs[i], 2e-5, $"output {i}");
        for (var i = 0; i < fused.grads.Length; i++) AssertClose(fused.grads[i], composite.grads[i], 2e-5, $"gradient {i}");
    }

    [Fact]
    public void Frozen_magnitudes_and_no_grad_still_fuse_exactly()
    {
        torchx.manual_seed(23);
        using var q = Layer(16, 16, bias: false, ScalarType.Float32);
        using var k = Layer(16, 8, bias: false, ScalarType.Float32);
        using var v = Layer(16, 8, bias: false, ScalarType.Float32);
        foreach (var l in new[] { q, k, v }) DoraVariant.Layer(l, "default").weight.requires_grad = false;
        var trainable = new[] { q, k, v }.SelectMany(l => new[] { l.A("default"), l.B("default") }).ToList();
        using var x0 = randn([2, 3, 16], ScalarType.Float32, Dev);
        var block = nn.Identity();
        var fused = Run(x0, trainable, x => LoraFusion.TryQkv(block, q, k, v, x, fused: true) is var (a, b, c) ? [a, b, c] : []);
        Assert.Equal("fused", LoraFusionPaths.Of(block));
        var composite = Run(x0, trainable, x => [q.call(x), k.call(x), v.call(x)]);
        for (var i = 0; i < 3; i++) AssertClose(fused.outs[i], composite.outs[i], 2e-5, $"output {i}");
        for (var i = 0; i < fused.grads.Length; i++) AssertClose(fused.grads[i], composite.grads[i], 2e-5, $"gradient {i}");

        using var _ = no_grad();
        var inference = LoraFusion.TryQkv(block, q, k, v, x0, fused: true)!.Value;
        AssertClose(inference.q, q.call(x0), 2e-5, "no-grad q");
        AssertClose(inference.v, v.call(x0), 2e-5, "no-grad v");
    }

    private static LlamaConfig Tiny() => new()
    {
        HiddenSize = 32, IntermediateSize = 48, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
        VocabSize = 64, TieWordEmbeddings = true, RopeTheta = 10000, MaxPositionEmbeddings = 64,
    };

    private static (LlamaForCausalLM model, LoraAdapter adapter) Llama(double dropout = 0, bool detach = true)
    {
        torchx.manual_seed(5);
        var model = LlamaForCausalLM.CreateRandom(Tiny(), ScalarType.Float32, Dev, seed: 1);
        var options = new DoraOptions
        {
            R = 4, LoraAlpha = 8, TargetModules = Targets, LoraDropout = dropout, DetachNorm = detach,
            // Random B (not zeros), so every gradient of A, m and x carries the update's signal.
            InitLoraWeights = LoraInit.Random,
        };
        var adapter = (LoraAdapter)new DoraMethod().Attach(model, options);
        // m/‖V‖ away from 1, so the magnitudes matter.
        using (no_grad())
            foreach (var layer in adapter.Layers.Values)
            {
                var m = DoraVariant.Layer(layer, "default").weight;
                m.mul_(rand(m.shape, m.dtype, m.device).add(0.5));
            }
        model.train();
        return (model, adapter);
    }

    private static Tensor Ids()
    {
        using var gen = new Generator(9);
        return randint(0, 64, [2, 8], generator: gen).to(Dev);
    }

    private static IEnumerable<nn.Module> Blocks(LlamaForCausalLM model, string suffix) =>
        model.named_modules().Where(m => m.name.EndsWith(suffix)).Select(m => m.module);

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Llama_with_dora_takes_the_fused_blocks_with_the_composite_loss_and_gradients(bool checkpointing)
    {
        var (model, adapter) = Llama();
        using var _ = model;
        using var __ = adapter;
        model.GradientCheckpointing = checkpointing;
        using var ids = Ids();
        var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).ToList();
        Assert.Equal(2 * 7 * 3, trainable.Count);
        Assert.Equal(2 * 7, trainable.Count(p => p.name.Contains(DoraVariant.MagnitudeKey)));

        (double loss, Dictionary<string, Tensor> grads) Run(bool fused) => WithFused(fused, () =>
        {
            foreach (var (_, p) in trainable) p.grad = null;
            // A training step, so the detached norm is cached for it (the checkpoint recompute reuses it).
            adapter.OnStepBegin(0);
            try
            {
                using var loss = model.ComputeLoss(ids, ids);
                loss.backward();
                return (loss.ToDouble(), trainable.ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone()));
            }
            finally
            {
                adapter.OnStepEnd(0);
            }
        });

        var (mlpBefore, qkvBefore) = (LoraFusion.MlpCount, LoraFusion.QkvCount);
        var fused = Run(true);
        var calls = checkpointing ? 4 : 2;
        Assert.Equal(mlpBefore + calls, LoraFusion.MlpCount);
        Assert.Equal(qkvBefore + calls, LoraFusion.QkvCount);
        Assert.Equal("qkv: fused n=2 [0-1]; mlp: fused n=2 [0-1]; o_proj: fused n=2 [0-1]", LoraFusionPaths.Report(model.named_modules()));

        var composite = Run(false);
        Assert.Equal(mlpBefore + calls, LoraFusion.MlpCount);
        Assert.True(Math.Abs(fused.loss - composite.loss) <= 1e-5 * Math.Abs(composite.loss), $"loss fused {fused.loss}, composite {composite.loss}");
        foreach (var (name, g) in composite.grads) AssertClose(fused.grads[name], g, 1e-4, name);
    }

    [Fact]
    public void A_norm_that_is_not_detached_or_dropout_in_training_keeps_the_composite_path()
    {
        using var ids = Ids();
        var (model, adapter) = Llama(detach: false);
        using (model)
        using (adapter)
        {
            var before = LoraFusion.MlpCount;
            WithFused(true, () => model.ComputeLoss(ids, ids).ToDouble());
            Assert.Equal(before, LoraFusion.MlpCount);
            Assert.All(Blocks(model, ".mlp"), m => Assert.Equal("composite (gate_proj: DoRA norm not detached (DetachNorm = false))", LoraFusionPaths.Of(m)));
            Assert.All(Blocks(model, ".self_attn"), m => Assert.Equal("composite (q_proj: DoRA norm not detached (DetachNorm = false))", LoraFusionPaths.Of(m)));

            // Without grad the norm's gradient is moot: the fused path is exact and taken.
            using var _ = no_grad();
            var fused = WithFused(true, () => model.ComputeLoss(ids, ids).ToDouble());
            Assert.Equal(before + 2, LoraFusion.MlpCount);
            var composite = WithFused(false, () => model.ComputeLoss(ids, ids).ToDouble());
            Assert.True(Math.Abs(fused - composite) <= 1e-5 * Math.Abs(composite), $"fused {fused}, composite {composite}");
        }

        (model, adapter) = Llama(dropout: 0.05);
        using (model)
        using (adapter)
        {
            var before = LoraFusion.QkvCount;
            WithFused(true, () => model.ComputeLoss(ids, ids).ToDouble());
            Assert.Equal(before, LoraFusion.QkvCount);
            Assert.All(Blocks(model, ".mlp"), m => Assert.Equal("composite (gate_proj: dropout 0.05)", LoraFusionPaths.Of(m)));
            // In eval dropout is the identity: fused.
            model.eval();
            using var _ = no_grad();
            WithFused(true, () => model.ComputeLoss(ids, ids).ToDouble());
            Assert.Equal(before + 2, LoraFusion.QkvCount);
        }
    }

    [Fact]
    public void Training_with_dora_gives_the_same_losses_fused_and_composite()
    {
        List<double> Train(bool fused)
        {
            var (model, adapter) = Llama();
            using var _ = model;
            using var __ = adapter;
            using var ids = Ids();
            using var optimizer = new AdamW(adapter.ParameterGroups(1e-2, 0.0));
            var losses = new List<double>();
            for (var step = 0; step < 5; step++)
                losses.Add(WithFused(fused, () =>
                {
                    using var scope = NewDisposeScope();
                    adapter.OnStepBegin(step);
                    var loss = model.ComputeLoss(ids, ids);
                    loss.backward();
                    optimizer.step();
                    optimizer.zero_grad();
                    adapter.OnStepEnd(step);
                    return loss.ToDouble();
                }));
            return losses;
        }

        var before = LoraFusion.MlpCount;
        var fused = Train(true);
        Assert.Equal(before + 10, LoraFusion.MlpCount);
        var composite = Train(false);
        Assert.True(composite[^1] < composite[0] - 1e-3, $"the loss did not fall: {string.Join(", ", composite)}");
        for (var i = 0; i < fused.Count; i++)
            Assert.True(Math.Abs(fused[i] - composite[i]) <= 1e-5 * Math.Abs(composite[i]), $"step {i}: fused {fused[i]}, composite {composite[i]}");
    }
}
