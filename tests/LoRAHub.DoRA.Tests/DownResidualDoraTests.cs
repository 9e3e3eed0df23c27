using LoRAHub.Models.Llama;

namespace LoRAHub.DoRA.Tests;

/// <summary>
/// DoRA with Llama's decoder layers handing the residual stream to the fused MLP (<see cref="LlamaMLP.forward_add"/>,
/// <see cref="LoraFusion.MlpResidual"/>): on CUDA one kernel adds down_proj's update, its row scale m/‖V‖ and the stream,
/// and writes c ⊙ inner for m's gradient; the loss and the gradients of A, B and every magnitude match the layer's own
/// add (the switch off), with and without activation checkpointing: bit for bit on the CPU (the same tensor ops there),
/// within bf16 rounding on CUDA, where the kernel must run once per layer and forward (twice with checkpointing).
/// </summary>
public class DownResidualDoraTests
{
    private static readonly Device Dev = torch.device(Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") ?? "cpu");

    private static bool Cuda => Dev.type == DeviceType.CUDA;

    private static readonly string[] Targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void The_stream_added_in_the_fused_block_gives_the_layer_add_loss_and_gradients(bool checkpointing)
    {
        torchx.manual_seed(5);
        var config = new LlamaConfig
        {
            HiddenSize = 32, IntermediateSize = 48, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
            VocabSize = 64, TieWordEmbeddings = true, RopeTheta = 10000, MaxPositionEmbeddings = 64,
        };
        using var model = LlamaForCausalLM.CreateRandom(config, Cuda ? ScalarType.BFloat16 : ScalarType.Float32, Dev, seed: 1);
        using var adapter = (LoraAdapter)new DoraMethod().Attach(model, new DoraOptions
        {
            R = 8, LoraAlpha = 16, TargetModules = Targets, InitLoraWeights = LoraInit.Random,
        });
        // m/‖V‖ away from 1, so the magnitudes matter.
        using (no_grad())
            foreach (var layer in adapter.Layers.Values)
            {
                var m = DoraVariant.Layer(layer, "default").weight;
                m.mul_(rand(m.shape, m.dtype, m.device).add(0.5));
            }
        model.train();
        model.GradientCheckpointing = checkpointing;
        using var gen = new Generator(9);
        using var ids = randint(0, 64, [2, 8], generator: gen).to(Dev);
        var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).ToList();
        Assert.Equal(2 * 7, trainable.Count(p => p.name.Contains(DoraVariant.MagnitudeKey)));

        (double loss, Dictionary<string, Tensor> grads, long launches, long calls) Run(bool residual)
        {
            var on = LoraFusion.MlpResidual;
            LoraFusion.MlpResidual = residual;
            try
            {
                return FusedBlocks.WithFused(true, () =>
                {
                    foreach (var (_, p) in trainable) p.grad = null;
                    var (launches, calls) = (LoraFusion.MlpResidualLaunches, LoraFusion.MlpResidualCount);
                    // A training step, so the detached norm is cached for it (the checkpoint recompute reuses it).
                    adapter.OnStepBegin(0);
                    try
                    {
                        using var loss = model.ComputeLoss(ids, ids);
                        loss.backward();
                        return (loss.ToDouble(), trainable.ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone()),
                            LoraFusion.MlpResidualLaunches - launches, LoraFusion.MlpResidualCount - calls);
                    }
                    finally
                    {
                        adapter.OnStepEnd(0);
                    }
                });
            }
            finally
            {
                LoraFusion.MlpResidual = on;
            }
        }

        var inBlock = Run(true);
        Assert.All(model.named_modules().Where(m => m.name.EndsWith(".mlp")), m => Assert.Equal("fused", LoraFusionPaths.Of(m.module)));
        // Two layers; with checkpointing each runs its forward again in backward.
        var calls = checkpointing ? 4 : 2;
        Assert.Equal(calls, inBlock.calls);
        Assert.Equal(Cuda ? calls : 0, inBlock.launches);
        var separate = Run(false);
        Assert.Equal((0L, 0L), (separate.launches, separate.calls));
        if (!Cuda)
        {
            Assert.Equal(separate.loss, inBlock.loss);
            foreach (var (name, g) in separate.grads) Assert.True(inBlock.grads[name].eq(g).all().item<bool>(), $"{name} differs");
            return;
        }
        Assert.True(Math.Abs(inBlock.loss - separate.loss) <= 1e-2 * Math.Abs(separate.loss), $"loss {inBlock.loss}, expected {separate.loss}");
        foreach (var (name, g) in separate.grads)
        {
            var scale = g.to(ScalarType.Float64).abs().max().ToDouble();
            var diff = (inBlock.grads[name].to(ScalarType.Float64) - g.to(ScalarType.Float64)).abs().max().ToDouble();
            Assert.True(diff <= 5e-2 * Math.Max(scale, 1e-6), $"{name}: max difference {diff}, scale {scale}");
        }
    }
}
