using LoRAHub.Models.Llama;

namespace LoRAHub.LoRA.Tests;

/// <summary>
/// Llama with LoRA on q, k, v: the fused q/k/v block's stacked bases (<see cref="StackedBases"/>, re-homing the three
/// frozen weights of each layer into one storage on the first fused call) give the unstacked loss and adapter gradients,
/// with and without activation checkpointing, GQA and MHA; the model's saved state (safetensors of its state dict) is
/// byte for byte what it was before re-homing; merge_and_unload afterwards gives the unmerged model's loss. On the test
/// device (LORAHUB_TEST_DEVICE).
/// </summary>
public class StackedQkvBasesTests
{
    private static readonly Device Dev = new(Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") ?? "cpu");

    private static (LlamaForCausalLM model, LoraAdapter adapter) Build(int kvHeads)
    {
        torchx.manual_seed(5);
        var model = LlamaForCausalLM.CreateRandom(new LlamaConfig
        {
            HiddenSize = 32, IntermediateSize = 48, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = kvHeads,
            VocabSize = 64, TieWordEmbeddings = true, RopeTheta = 10000, MaxPositionEmbeddings = 64,
        }, ScalarType.Float32, Dev, seed: 1);
        var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions
        {
            R = 4, LoraAlpha = 8, TargetModules = new[] { "q_proj", "k_proj", "v_proj", "o_proj" }, InitLoraWeights = LoraInit.Random,
        });
        model.train();
        return (model, adapter);
    }

    private static Tensor Ids()
    {
        using var gen = new Generator(9);
        return randint(0, 64, [2, 8], generator: gen).to(Dev);
    }

    private static T WithStacked<T>(bool on, Func<T> f, bool stackForward = true)
    {
        var (was, forward, onCuda) = (StackedBases.Enabled, StackedBases.StackForward, StackedBases.OnCuda);
        (StackedBases.Enabled, StackedBases.StackForward, StackedBases.OnCuda) = (on, on && stackForward, on);
        try
        {
            return FusedBlocks.WithFused(true, f);
        }
        finally
        {
            (StackedBases.Enabled, StackedBases.StackForward, StackedBases.OnCuda) = (was, forward, onCuda);
        }
    }

    // Each layer's q, k, v base weights back to back in memory (one storage after re-homing).
    private static bool Stacked(LlamaForCausalLM model, int layer)
    {
        var w = new[] { "q_proj", "k_proj", "v_proj" }
            .Select(p => model.get_submodule($"model.layers.{layer}.self_attn.{p}") switch
            {
                LoraLinear lora => lora.base_linear.dense_weight(),
                var plain => ((Linear)plain!).weight!,
            }).ToArray();
        return torchx.data_ptr(w[1]) == torchx.data_ptr(w[0]) + (nint)(w[0].numel() * w[0].element_size())
            && torchx.data_ptr(w[2]) == torchx.data_ptr(w[1]) + (nint)(w[1].numel() * w[1].element_size());
    }

    private static byte[] Saved(LlamaForCausalLM model, string dir, string name)
    {
        var path = Path.Combine(dir, name);
        torchx.save_safetensors(model.state_dict(), path);
        return File.ReadAllBytes(path);
    }

    [Theory]
    [InlineData(2, false)]
    [InlineData(2, true)]
    [InlineData(4, false)]
    public void Stacked_bases_keep_the_loss_gradients_saved_state_and_merge(int kvHeads, bool checkpointing)
    {
        var (model, adapter) = Build(kvHeads);
        using var _ = model;
        using var __ = adapter;
        model.GradientCheckpointing = checkpointing;
        using var ids = Ids();
        var dir = Directory.CreateTempSubdirectory("stacked-qkv-");
        try
        {
            var before = Saved(model, dir.FullName, "before.safetensors");
            var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).ToList();
            (double loss, Dictionary<string, Tensor> grads) Run(bool stacked) => WithStacked(stacked, () =>
            {
                foreach (var (_, p) in trainable) p.grad = null;
                using var loss = model.ComputeLoss(ids, ids);
                loss.backward();
                return (loss.ToDouble(), trainable.ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone()));
            });

            var three = Run(false);
            var one = Run(true);
            Assert.True(Stacked(model, 0) && Stacked(model, 1), "q/k/v weights not re-homed");
            Assert.All(model.named_modules().Where(m => m.name.EndsWith(".self_attn")), m => Assert.Equal("fused", LoraFusionPaths.Of(m.module)));
            Assert.True(Math.Abs(one.loss - three.loss) <= 1e-5 * Math.Abs(three.loss), $"loss stacked {one.loss}, unstacked {three.loss}");
            foreach (var (name, g) in three.grads)
            {
                var scale = g.abs().max().ToDouble();
                var diff = (one.grads[name] - g).abs().max().ToDouble();
                Assert.True(diff <= 1e-5 * Math.Max(scale, 1e-6), $"{name}: max difference {diff}, scale {scale}");
            }
            // The same bytes saved: each weight is still its own contiguous tensor.
            Assert.Equal(before, Saved(model, dir.FullName, "after.safetensors"));

            // merge_and_unload writes into the stack in place: the plain model gives the adapter's loss.
            model.eval();
            double Eval() => WithStacked(true, () =>
            {
                using var noGrad = no_grad();
                using var loss = model.ComputeLoss(ids, ids);
                return loss.ToDouble();
            });
            var unmerged = Eval();
            adapter.MergeAndUnload();
            Assert.True(Stacked(model, 1), "merging separated the weights");
            var merged = Eval();
            Assert.True(Math.Abs(merged - unmerged) <= 1e-5 * Math.Abs(unmerged), $"merged {merged}, unmerged {unmerged}");
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }
}
