using LoRAHub.Models.Llama;

namespace LoRAHub.LoRA.Tests;

/// <summary>
/// Llama's decoder layers hand the residual stream to the fused LoRA MLP (<see cref="LlamaMLP.forward_add"/>,
/// <see cref="LoraFusion.MlpResidual"/>), whose last kernel adds down_proj's update and the stream on CUDA: the same loss
/// and adapter gradients as the layer's own add (the switch off), with and without activation checkpointing (the layer's
/// output is what the checkpoint keeps and recomputes). Bit for bit on the CPU (the add is the same tensor op there),
/// within bf16 rounding on CUDA, where the kernel must run once per layer and forward (twice with checkpointing). A
/// block that is not fused adds the stream as before. On the test device (LORAHUB_TEST_DEVICE).
/// </summary>
public class DownResidualDecoderTests
{
    private static readonly Device Dev = new(Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") ?? "cpu");

    private static bool Cuda => Dev.type == DeviceType.CUDA;

    private static readonly string[] Targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    private static LlamaConfig Tiny() => new()
    {
        HiddenSize = 32, IntermediateSize = 48, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
        VocabSize = 64, TieWordEmbeddings = true, RopeTheta = 10000, MaxPositionEmbeddings = 64,
    };

    private sealed record Result(double Loss, Dictionary<string, Tensor> Grads, long Launches, long Calls);

    // Loss and adapter gradients with the stream handed to the MLP block (residual) or added by the layer, the blocks fused or not.
    private static Result Run(LlamaForCausalLM model, Tensor ids, bool residual, bool fused)
    {
        var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).ToList();
        var on = LoraFusion.MlpResidual;
        LoraFusion.MlpResidual = residual;
        try
        {
            return FusedBlocks.WithFused(fused, () =>
            {
                foreach (var (_, p) in trainable) p.grad = null;
                var (launches, calls) = (LoraFusion.MlpResidualLaunches, LoraFusion.MlpResidualCount);
                using var loss = model.ComputeLoss(ids, ids);
                loss.backward();
                return new Result(loss.ToDouble(), trainable.ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone()),
                    LoraFusion.MlpResidualLaunches - launches, LoraFusion.MlpResidualCount - calls);
            });
        }
        finally
        {
            LoraFusion.MlpResidual = on;
        }
    }

    private static void AssertSame(Result actual, Result expected, bool exact)
    {
        Assert.Equal(expected.Grads.Keys.OrderBy(k => k), actual.Grads.Keys.OrderBy(k => k));
        if (exact) Assert.Equal(expected.Loss, actual.Loss);
        else Assert.True(Math.Abs(actual.Loss - expected.Loss) <= 1e-2 * Math.Abs(expected.Loss), $"loss {actual.Loss}, expected {expected.Loss}");
        foreach (var (name, g) in expected.Grads)
        {
            var a = actual.Grads[name];
            if (exact)
            {
                Assert.True(a.eq(g).all().item<bool>(), $"{name} differs");
                continue;
            }
            var scale = g.abs().max().ToDouble();
            var diff = (a - g).abs().max().ToDouble();
            Assert.True(diff <= 5e-2 * Math.Max(scale, 1e-6), $"{name}: max difference {diff}, scale {scale}");
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void The_stream_added_in_the_fused_block_gives_the_layer_add_loss_and_gradients(bool checkpointing)
    {
        // bf16 rank 16 on CUDA (the kernel's case), fp32 on the CPU.
        torchx.manual_seed(5);
        using var model = LlamaForCausalLM.CreateRandom(Tiny(), Cuda ? ScalarType.BFloat16 : ScalarType.Float32, Dev, seed: 1);
        using var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions
        {
            R = 16, LoraAlpha = 32, TargetModules = Targets, InitLoraWeights = LoraInit.Random,
        });
        model.train();
        model.GradientCheckpointing = checkpointing;
        using var gen = new Generator(9);
        using var ids = randint(0, 64, [2, 8], generator: gen).to(Dev);

        var inBlock = Run(model, ids, residual: true, fused: true);
        Assert.All(model.named_modules().Where(m => m.name.EndsWith(".mlp")), m => Assert.Equal("fused", LoraFusionPaths.Of(m.module)));
        // Two layers; with checkpointing each runs its forward again in backward.
        var calls = checkpointing ? 4 : 2;
        Assert.Equal(calls, inBlock.Calls);
        Assert.Equal(Cuda ? calls : 0, inBlock.Launches);
        var separate = Run(model, ids, residual: false, fused: true);
        Assert.Equal((0L, 0L), (separate.Launches, separate.Calls));
        AssertSame(inBlock, separate, exact: !Cuda);
    }

    [Fact]
    public void A_composite_block_adds_the_stream_as_before()
    {
        torchx.manual_seed(5);
        using var model = LlamaForCausalLM.CreateRandom(Tiny(), ScalarType.Float32, Dev, seed: 1);
        using var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions
        {
            R = 4, LoraAlpha = 8, TargetModules = Targets, InitLoraWeights = LoraInit.Random,
        });
        model.train();
        using var gen = new Generator(9);
        using var ids = randint(0, 64, [2, 8], generator: gen).to(Dev);
        var inBlock = Run(model, ids, residual: true, fused: false);
        Assert.All(model.named_modules().Where(m => m.name.EndsWith(".mlp")), m => Assert.Equal("composite (lora_mlp off)", LoraFusionPaths.Of(m.module)));
        Assert.Equal((0L, 0L), (inBlock.Launches, inBlock.Calls));
        AssertSame(inBlock, Run(model, ids, residual: false, fused: false), exact: true);
    }
}
