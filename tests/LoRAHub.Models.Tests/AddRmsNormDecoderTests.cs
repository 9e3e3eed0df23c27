using LoRAHub.Models.Llama;

namespace LoRAHub.Models.Tests;

using FX = LoRAHub.TorchExtensions.torchx.nn.functional;

/// <summary>
/// The decoder layer's residual add and post_attention_layernorm as one op, and input_layernorm adding the residual
/// stream's gradient in its backward (torchx.nn.functional.add_rms_norm with and without a residual), against the
/// separate ops: the same logits and parameter gradients, plain and packed rows, with activation checkpointing, fp32 and
/// bf16; Gemma (its own norm, sandwich norms) keeps the two ops. Exact on the CPU (the composite path is the two ops);
/// on CUDA (LORAHUB_TEST_DEVICE=cuda) the fused kernels run, counted, within rounding.
/// </summary>
[Collection(RunsAlone.Name)]
public sealed class AddRmsNormDecoderTests
{
    // Alone: it switches add_rms_norm process-wide and counts its launches.

    private static readonly Device Dev = TinyModels.Device;

    private static double RelativeError(Tensor a, Tensor b)
    {
        using var scope = NewDisposeScope();
        var (a32, b32) = (a.to(ScalarType.Float32), b.to(ScalarType.Float32));
        return (a32 - b32).norm().item<float>() / Math.Max(b32.norm().item<float>(), 1e-12);
    }

    [Theory]
    [InlineData("llama", ScalarType.Float32, false, false)]
    [InlineData("llama", ScalarType.BFloat16, false, false)]
    [InlineData("llama", ScalarType.BFloat16, true, false)]  // packed rows
    [InlineData("llama", ScalarType.Float32, false, true)]   // every layer checkpointed: the add recomputed in backward
    [InlineData("gemma2", ScalarType.Float32, false, false)] // sandwich norms, (1 + w) norm: the two ops either way
    public void Logits_and_gradients_match_the_two_ops(string modelType, ScalarType dtype, bool packed, bool checkpointing)
    {
        var config = TinyModels.LlamaConfig(modelType);
        config.HiddenSize = 128; // whole 16-byte packs per row: the row kernel on CUDA
        config.IntermediateSize = 128;
        using var model = LlamaForCausalLM.CreateRandom(config, dtype, Dev, seed: 3);
        model.train();
        model.GradientCheckpointing = checkpointing;
        var gen = new Random(5);
        long b = 2, t = 24;
        var ids = tensor(Enumerable.Range(0, (int)(b * t)).Select(_ => (long)gen.Next(1, 64)).ToArray(), [b, t], device: Dev);
        var positions = arange(0, b * t, 1, ScalarType.Int64, Dev).remainder(t).remainder(9).view(b, t);
        var upstream = tensor(Enumerable.Range(0, (int)(b * t * 64)).Select(_ => (float)(gen.NextDouble() * 2 - 1)).ToArray(), [b, t, 64], device: Dev);
        var fusedLlamaNorm = modelType == "llama" && Dev.type == DeviceType.CUDA && FX.Fused.RmsNorm;
        var results = new List<(Tensor logits, Dictionary<string, Tensor> grads)>();
        var enabled = FX.FusedAddRmsNorm;
        try
        {
            foreach (var on in new[] { false, true })
            {
                FX.FusedAddRmsNorm = on;
                using var scope = NewDisposeScope();
                model.zero_grad();
                var before = FX.FusedAddRmsNormLaunches;
                var logits = packed ? model.ForwardPacked(ids, positions) : model.Forward(ids);
                (logits.to(ScalarType.Float32) * upstream).sum().backward();
                // Per layer: post_attention_layernorm's forward and backward, input_layernorm's backward (the forward
                // without a residual is not counted); checkpointed, post_attention_layernorm's forward runs again.
                var expected = on && fusedLlamaNorm ? config.NumHiddenLayers * (checkpointing ? 4 : 3) : 0;
                Assert.Equal(before + expected, FX.FusedAddRmsNormLaunches);
                var grads = model.named_parameters().Where(p => p.parameter.grad is not null)
                    .ToDictionary(p => p.name, p => p.parameter.grad!.to(ScalarType.Float32).cpu().DetachFromDisposeScope());
                results.Add((logits.detach().to(ScalarType.Float32).cpu().DetachFromDisposeScope(), grads));
            }
        }
        finally
        {
            FX.FusedAddRmsNorm = enabled;
        }
        Assert.NotEmpty(results[0].grads);
        Assert.Equal(results[0].grads.Keys.OrderBy(k => k), results[1].grads.Keys.OrderBy(k => k));
        if (!fusedLlamaNorm)
        {
            // The composite path is the two ops: the same bits.
            Assert.True(TinyModels.Equal(results[1].logits, results[0].logits), "logits");
            foreach (var (name, g) in results[0].grads) Assert.True(TinyModels.Equal(results[1].grads[name], g), name);
            return;
        }
        var tol = dtype == ScalarType.Float32 ? 1e-5 : 2e-2;
        Assert.True(RelativeError(results[1].logits, results[0].logits) < tol, "logits");
        foreach (var (name, g) in results[0].grads)
        {
            var err = RelativeError(results[1].grads[name], g);
            Assert.True(err < tol, $"{name}: relative error {err}");
        }
    }
}
