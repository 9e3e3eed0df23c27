using LoRAHub.Models.Llama;

namespace LoRAHub.LoRA.Tests;

/// <summary>
/// The fused LoRA blocks inside Llama (issue 19): with LoRA on all seven projections they are taken (the counters move,
/// every block reports "fused") and give the composite path's loss and adapter gradients, with and without activation
/// checkpointing; dropout in training, two active adapters and a variant send the block to the composite path with the
/// reason recorded; a 4-bit base is fused with its weight dequantized inside; a few training steps give the same losses
/// either way. On the test device (LORAHUB_TEST_DEVICE).
/// </summary>
public class FusedLoraBlockTests
{
    private static readonly Device Dev = new(Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") ?? "cpu");

    private static readonly string[] Targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    private static LlamaConfig Tiny() => new()
    {
        HiddenSize = 32, IntermediateSize = 48, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
        VocabSize = 64, TieWordEmbeddings = true, RopeTheta = 10000, MaxPositionEmbeddings = 64,
    };

    private static LoraOptions Options(double dropout = 0) => new()
    {
        R = 4, LoraAlpha = 8, TargetModules = Targets, LoraDropout = dropout,
        // Random B (not zeros), so every gradient of A and x carries the update's signal.
        InitLoraWeights = LoraInit.Random,
    };

    private static (LlamaForCausalLM model, LoraAdapter adapter) Build(double dropout = 0)
    {
        torchx.manual_seed(5);
        var model = LlamaForCausalLM.CreateRandom(Tiny(), ScalarType.Float32, Dev, seed: 1);
        var adapter = (LoraAdapter)new LoraMethod().Attach(model, Options(dropout));
        model.train();
        return (model, adapter);
    }

    private static Tensor Ids()
    {
        using var gen = new Generator(9);
        return randint(0, 64, [2, 8], generator: gen).to(Dev);
    }

    private static T WithFused<T>(bool on, Func<T> f) => FusedBlocks.WithFused(on, f);

    private static IEnumerable<nn.Module> Blocks(LlamaForCausalLM model, string suffix) =>
        model.named_modules().Where(m => m.name.EndsWith(suffix)).Select(m => m.module);

    private static void AssertLoss(double fused, double composite) =>
        Assert.True(Math.Abs(fused - composite) <= 1e-5 * Math.Abs(composite), $"loss fused {fused}, composite {composite}");

    private static void AssertClose(Tensor actual, Tensor expected, double tol, string what)
    {
        var scale = expected.abs().max().ToDouble();
        var diff = (actual - expected).abs().max().ToDouble();
        Assert.True(diff <= tol * Math.Max(scale, 1e-6), $"{what}: max difference {diff}, scale {scale}");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Fused_blocks_give_the_composite_loss_and_gradients(bool checkpointing)
    {
        var (model, adapter) = Build();
        using var _ = model;
        using var __ = adapter;
        model.GradientCheckpointing = checkpointing;
        using var ids = Ids();
        var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).ToList();
        Assert.Equal(2 * 7 * 2, trainable.Count);

        (double loss, Dictionary<string, Tensor> grads) Run(bool fused) => WithFused(fused, () =>
        {
            foreach (var (_, p) in trainable) p.grad = null;
            using var loss = model.ComputeLoss(ids, ids);
            loss.backward();
            return (loss.ToDouble(), trainable.ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone()));
        });

        var (mlpBefore, qkvBefore) = (LoraFusion.MlpCount, LoraFusion.QkvCount);
        var fused = Run(true);
        // Two layers; with checkpointing each block runs again in backward.
        var calls = checkpointing ? 4 : 2;
        Assert.Equal(mlpBefore + calls, LoraFusion.MlpCount);
        Assert.Equal(qkvBefore + calls, LoraFusion.QkvCount);
        Assert.All(Blocks(model, ".mlp"), m => Assert.Equal("fused", LoraFusionPaths.Of(m)));
        Assert.All(Blocks(model, ".self_attn"), m => Assert.Equal("fused", LoraFusionPaths.Of(m)));
        Assert.Equal("qkv: fused n=2 [0-1]; mlp: fused n=2 [0-1]; o_proj: fused n=2 [0-1]", LoraFusionPaths.Report(model.named_modules()));

        var composite = Run(false);
        Assert.Equal("composite (lora_mlp off)", LoraFusionPaths.Of(Blocks(model, ".mlp").First()));
        Assert.Equal(mlpBefore + calls, LoraFusion.MlpCount);
        AssertLoss(fused.loss, composite.loss);
        foreach (var (name, g) in composite.grads) AssertClose(fused.grads[name], g, 1e-5, name);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Bf16_rank_16_blocks_give_the_composite_loss_and_gradients(bool checkpointing)
    {
        // bf16 with rank 16 on every projection: on CUDA the MLP's low-rank updates go into the SwiGLU kernels on tensor
        // cores (LoraMlpKernels; their own tests count the launches), with checkpointing also in the recomputed forward.
        torchx.manual_seed(5);
        using var model = LlamaForCausalLM.CreateRandom(Tiny(), ScalarType.BFloat16, Dev, seed: 1);
        using var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions
        {
            R = 16, LoraAlpha = 32, TargetModules = Targets, InitLoraWeights = LoraInit.Random,
        });
        model.train();
        model.GradientCheckpointing = checkpointing;
        using var ids = Ids();
        var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).ToList();
        (double loss, Dictionary<string, Tensor> grads) Run(bool fused) => WithFused(fused, () =>
        {
            foreach (var (_, p) in trainable) p.grad = null;
            using var loss = model.ComputeLoss(ids, ids);
            loss.backward();
            return (loss.ToDouble(), trainable.ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone()));
        });
        var fused = Run(true);
        Assert.All(Blocks(model, ".mlp"), m => Assert.Equal("fused", LoraFusionPaths.Of(m)));
        var composite = Run(false);
        Assert.True(Math.Abs(fused.loss - composite.loss) <= 1e-2 * Math.Abs(composite.loss), $"loss fused {fused.loss}, composite {composite.loss}");
        foreach (var (name, g) in composite.grads) AssertClose(fused.grads[name], g, 5e-2, name);
    }

    [Fact]
    public void Dropout_in_training_takes_the_composite_path_and_eval_the_fused_one()
    {
        var (model, adapter) = Build(dropout: 0.05);
        using var _ = model;
        using var __ = adapter;
        using var ids = Ids();
        var before = LoraFusion.MlpCount;
        WithFused(true, () => model.ComputeLoss(ids, ids));
        Assert.Equal(before, LoraFusion.MlpCount);
        Assert.All(Blocks(model, ".mlp"), m => Assert.Equal("composite (gate_proj: dropout 0.05)", LoraFusionPaths.Of(m)));
        Assert.All(Blocks(model, ".self_attn"), m => Assert.Equal("composite (q_proj: dropout 0.05)", LoraFusionPaths.Of(m)));

        // In eval dropout does nothing: the fused path is exact again.
        model.eval();
        using var noGrad = no_grad();
        var fused = WithFused(true, () => model.ComputeLoss(ids, ids).ToDouble());
        Assert.Equal(before + 2, LoraFusion.MlpCount);
        var composite = WithFused(false, () => model.ComputeLoss(ids, ids).ToDouble());
        AssertLoss(fused, composite);
    }

    [Fact]
    public void Two_active_adapters_take_the_composite_path()
    {
        var (model, adapter) = Build();
        using var _ = model;
        using var __ = adapter;
        using var ids = Ids();
        adapter.AddAdapter("second", Options());
        adapter.SetActiveAdapters([LoraAdapter.DefaultName, "second"]);
        var before = LoraFusion.MlpCount;
        var composite = WithFused(true, () => model.ComputeLoss(ids, ids).ToDouble());
        Assert.Equal(before, LoraFusion.MlpCount);
        Assert.Equal("composite (gate_proj: 2 active adapters)", LoraFusionPaths.Of(Blocks(model, ".mlp").First()));

        // One of them active again: fused.
        adapter.SetActiveAdapter("second");
        WithFused(true, () => model.ComputeLoss(ids, ids).ToDouble());
        Assert.Equal(before + 2, LoraFusion.MlpCount);
        Assert.NotEqual(0, composite);
    }

    /// <summary>A variant that changes nothing but is one: the fused block must not assume plain LoRA for it.</summary>
    private sealed class MarkerVariant : ILoraVariant
    {
        public string ConfigFlag => "marker";
        public LoraOptions CreateOptions() => new();
        public void Init(LoraLinear layer, string adapter) { }
        public Tensor Forward(LoraLinear layer, string adapter, Tensor x, Tensor result) => result.alias();
        public void Merge(LoraLinear layer, string adapter) { }
        public void Unmerge(LoraLinear layer, string adapter) { }
        public IEnumerable<(string key, Parameter tensor)> Tensors(LoraLinear layer, string adapter) => [];
        public IEnumerable<(string key, long[] shape)> Shapes(ILinearLayer baseLayer, int r) => [];
    }

    [Fact]
    public void A_variant_takes_the_composite_path_and_a_merged_adapter_the_base_only_parts()
    {
        var (model, adapter) = Build();
        using var _ = model;
        using var __ = adapter;
        using var ids = Ids();
        var up = (LoraLinear)model.get_submodule("model.layers.1.mlp.up_proj")!;
        up.UpdateLayer(LoraAdapter.DefaultName, 4, 8, 0, false, LoraInit.Random, ScalarType.Float32, variant: new MarkerVariant());
        WithFused(true, () => model.ComputeLoss(ids, ids).ToDouble());
        var mlps = Blocks(model, ".mlp").ToList();
        Assert.Equal("fused", LoraFusionPaths.Of(mlps[0]));
        Assert.Equal("composite (up_proj: variant MarkerVariant)", LoraFusionPaths.Of(mlps[1]));

        // Merged: forward is the (merged) base alone, which the block may still fuse as a frozen Linear.
        var gate = (LoraLinear)model.get_submodule("model.layers.0.mlp.gate_proj")!;
        gate.Merge(LoraAdapter.DefaultName);
        var parts = gate.low_rank_parts(out var reason);
        Assert.NotNull(parts);
        Assert.False(parts!.HasUpdate);
        Assert.Equal("", reason);
    }

    [Fact]
    public void A_4bit_base_is_fused_with_its_weight_dequantized_inside()
    {
        torchx.manual_seed(3);
        LoraLinear Layer(long outF)
        {
            using var dense = nn.Linear(32, outF, hasBias: false);
            var q = LoRAHub.TorchExtensions.Modules.Linear4bit.FromLinear(LinearLayer.From(dense)!, Dev, "nf4", 64, double_quant: true, compute_dtype: ScalarType.Float32);
            var layer = new LoraLinear(q);
            layer.UpdateLayer("a", 4, 8, 0, false, LoraInit.Random, ScalarType.Float32);
            layer.ActiveAdapters = ["a"];
            return layer;
        }
        using var q = Layer(32);
        using var k = Layer(16);
        using var v = Layer(16);
        var parts = q.low_rank_parts(out _);
        Assert.True(parts is { Weight: null, Dequantize: not null, HasUpdate: true });
        using var x0 = randn(2, 3, 32).to(Dev);
        var trainable = new[] { q, k, v }.SelectMany(l => new[] { l.A("a"), l.B("a") }).ToList();
        (Tensor[] outs, Tensor[] grads) Run(Func<Tensor, Tensor[]> f)
        {
            foreach (var p in trainable) p.grad = null;
            var outs = f(x0);
            outs.Select(o => o.square().sum()).Aggregate((a, b) => a + b).backward();
            return (outs.Select(o => o.detach()).ToArray(), trainable.Select(p => p.grad!.clone()).ToArray());
        }
        var block = nn.Identity();
        var fused = Run(x => LoraFusion.TryQkv(block, q, k, v, x, fused: true) is var (a, b, c) ? [a, b, c] : throw new Xunit.Sdk.XunitException(LoraFusionPaths.Of(block)));
        var composite = Run(x => [q.call(x), k.call(x), v.call(x)]);
        for (var i = 0; i < 3; i++) AssertClose(fused.outs[i], composite.outs[i], 1e-5, $"output {i}");
        for (var i = 0; i < trainable.Count; i++) AssertClose(fused.grads[i], composite.grads[i], 1e-5, $"gradient {i}");
    }

    [Fact]
    public void Training_gives_the_same_losses_fused_and_composite()
    {
        List<double> Train(bool fused)
        {
            var (model, adapter) = Build();
            using var _ = model;
            using var __ = adapter;
            using var ids = Ids();
            using var optimizer = new AdamW(adapter.ParameterGroups(1e-2, 0.0));
            var losses = new List<double>();
            for (var step = 0; step < 5; step++)
                losses.Add(WithFused(fused, () =>
                {
                    using var scope = NewDisposeScope();
                    var loss = model.ComputeLoss(ids, ids);
                    loss.backward();
                    optimizer.step();
                    optimizer.zero_grad();
                    return loss.ToDouble();
                }));
            return losses;
        }

        var before = LoraFusion.MlpCount;
        var fused = Train(true);
        Assert.Equal(before + 10, LoraFusion.MlpCount);
        var composite = Train(false);
        Assert.True(composite[^1] < composite[0] - 1e-3, $"the loss did not fall: {string.Join(", ", composite)}");
        for (var i = 0; i < fused.Count; i++) Assert.True(Math.Abs(fused[i] - composite[i]) <= 1e-5 * Math.Abs(composite[i]),
            $"step {i}: fused {fused[i]}, composite {composite[i]}");
    }
}
