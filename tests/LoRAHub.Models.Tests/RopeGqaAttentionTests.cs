using LoRAHub.Models.Llama;
using LoRAHub.TorchExtensions;

namespace LoRAHub.Models.Tests;

using FX = LoRAHub.TorchExtensions.torchx.nn.functional;

/// <summary>
/// Llama attention with q/k rotated and k/v repeated by one kernel (torchx.nn.functional.rotary_embedding_gqa) against
/// the older path (rope kernel per tensor, expand-and-copy repeat): the same logits and parameter gradients, grouped and
/// equal head counts, fp32 and bf16, plain and packed rows (per-position tables). On CUDA when LORAHUB_TEST_DEVICE=cuda.
/// </summary>
[Collection(RunsAlone.Name)]
public sealed class RopeGqaAttentionTests
{
    // Alone: it switches the kernel process-wide and counts its launches.

    private static readonly Device Dev = TinyModels.Device;

    private static LlamaConfig Config(int heads, int kvHeads)
    {
        var config = TinyModels.LlamaConfig();
        config.HiddenSize = 128;         // head_dim 128 / heads: 16 or 32, whole 16-byte vectors
        config.IntermediateSize = 128;
        config.NumAttentionHeads = heads;
        config.NumKeyValueHeads = kvHeads;
        return config;
    }

    // Relative L2 error of a against b.
    private static double RelativeError(Tensor a, Tensor b)
    {
        using var scope = NewDisposeScope();
        var (a32, b32) = (a.to(ScalarType.Float32), b.to(ScalarType.Float32));
        return (a32 - b32).norm().item<float>() / Math.Max(b32.norm().item<float>(), 1e-12);
    }

    // One forward and backward of the model against a fixed upstream gradient: the logits and every parameter gradient
    // (fp32, on the CPU, out of the scopes).
    // Token ids (b × t, vocabulary 64) and an upstream gradient for the logits (b × t × 64), drawn from one seeded generator.
    private static (Tensor ids, Tensor upstream) Batch(int seed, long b, long t)
    {
        var gen = new Random(seed);
        var ids = tensor(Enumerable.Range(0, (int)(b * t)).Select(_ => (long)gen.Next(1, 64)).ToArray(), [b, t], device: Dev);
        var upstream = tensor(Enumerable.Range(0, (int)(b * t * 64)).Select(_ => (float)(gen.NextDouble() * 2 - 1)).ToArray(), [b, t, 64], device: Dev);
        return (ids, upstream);
    }

    private static (Tensor logits, Dictionary<string, Tensor> grads) Pass(LlamaForCausalLM model, Func<Tensor> forward, Tensor upstream)
    {
        using var scope = NewDisposeScope();
        model.zero_grad();
        var logits = forward();
        (logits.to(ScalarType.Float32) * upstream).sum().backward();
        var grads = model.named_parameters().Where(p => p.parameter.grad is not null)
            .ToDictionary(p => p.name, p => p.parameter.grad!.to(ScalarType.Float32).cpu().DetachFromDisposeScope());
        return (logits.detach().to(ScalarType.Float32).cpu().DetachFromDisposeScope(), grads);
    }

    // The second pass's logits and gradients within `bound` (relative L2) of the first's; both passes freed.
    private static void AssertSame((Tensor logits, Dictionary<string, Tensor> grads) first, (Tensor logits, Dictionary<string, Tensor> grads) second,
        double bound, string what)
    {
        Assert.True(RelativeError(second.logits, first.logits) < bound, $"{what}: logits differ by {RelativeError(second.logits, first.logits)}");
        Assert.Equal(first.grads.Keys.OrderBy(k => k), second.grads.Keys.OrderBy(k => k));
        Assert.Contains(first.grads.Keys, k => k.EndsWith("k_proj.weight"));
        foreach (var (name, g) in first.grads)
        {
            var err = RelativeError(second.grads[name], g);
            Assert.True(err < bound, $"{what} {name}: gradient differs by {err}");
        }
        foreach (var x in first.grads.Values.Concat(second.grads.Values).Append(first.logits).Append(second.logits)) x.Dispose();
    }

    [Theory]
    [InlineData(8, 2, ScalarType.Float32, false)]
    [InlineData(8, 2, ScalarType.BFloat16, false)]
    [InlineData(4, 4, ScalarType.BFloat16, false)] // equal head counts: q and k rotated by one kernel, no repeat
    [InlineData(4, 1, ScalarType.BFloat16, true)]  // packed rows: tables gathered per position
    [InlineData(8, 2, ScalarType.Float32, true)]
    public void Logits_and_gradients_match_the_older_path(int heads, int kvHeads, ScalarType dtype, bool packed)
    {
        if (Dev.type != DeviceType.CUDA || !FX.Fused.Rope) return; // LORAHUB_FUSED without rope: no rope kernel at all
        var config = Config(heads, kvHeads);
        // One model and one batch for both paths (a model per path would depend on the global generator's sequence).
        using var model = LlamaForCausalLM.CreateRandom(config, dtype, Dev, seed: 7);
        model.train();
        long b = 2, t = 40;
        var (ids, upstream) = Batch(11, b, t);
        // Packed: examples of 13 tokens laid end to end in each row (positions restart at 0 every 13).
        var positions = arange(0, b * t, 1, ScalarType.Int64, Dev).remainder(t).remainder(13).view(b, t);
        var results = new List<(Tensor logits, Dictionary<string, Tensor> grads)>();
        var enabled = FX.FusedRopeGqa;
        try
        {
            foreach (var on in new[] { false, true })
            {
                FX.FusedRopeGqa = on;
                var before = FX.FusedRopeGqaLaunches;
                results.Add(Pass(model, () => packed ? model.ForwardPacked(ids, positions) : model.Forward(ids), upstream));
                // One launch per layer forward and one backward (this collection runs alone); none on the older path.
                Assert.Equal(before + (on ? 2 * config.NumHiddenLayers : 0), FX.FusedRopeGqaLaunches);
            }
        }
        finally
        {
            FX.FusedRopeGqa = enabled;
        }
        // fp32: rounding-level; bf16: one rounding fewer in the group sums of dk, dv, amplified through two layers.
        AssertSame(results[0], results[1], dtype == ScalarType.Float32 ? 1e-5 : 2e-2, $"{dtype}");
    }

    // Grouped heads left grouped for libtorch's own grouped-query SDPA (the rope kernel rotating k and copying v on CUDA)
    // against k and v repeated: the same logits and gradients, on every device.
    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void Grouped_heads_left_grouped_match_the_repeat(ScalarType dtype)
    {
        if (dtype != ScalarType.Float32 && Dev.type != DeviceType.CUDA) return;
        Assert.True(FX.scaled_dot_product_attention_takes_gqa, "libtorch's grouped-query SDPA is not reachable");
        var config = Config(8, 2);
        using var model = LlamaForCausalLM.CreateRandom(config, dtype, Dev, seed: 9);
        model.train();
        long b = 2, t = 40;
        var (ids, upstream) = Batch(12, b, t);
        var results = new List<(Tensor logits, Dictionary<string, Tensor> grads)>();
        var native = FX.NativeGqa;
        try
        {
            foreach (var on in new[] { false, true })
            {
                FX.NativeGqa = on;
                var before = FX.NativeGqaCalls;
                results.Add(Pass(model, () => model.Forward(ids), upstream));
                Assert.Equal(before + (on ? config.NumHiddenLayers : 0), FX.NativeGqaCalls);
            }
        }
        finally
        {
            FX.NativeGqa = native;
        }
        // fp32: rounding-level; bf16: dk, dv summed over the groups inside the attention rather than by the rope kernel.
        AssertSame(results[0], results[1], dtype == ScalarType.Float32 ? 1e-5 : 2e-2, $"{dtype} grouped vs repeated");
    }

    [Fact]
    public void The_kernel_is_refused_off_cuda_and_for_partial_rotary_tables()
    {
        using var scope = NewDisposeScope();
        var q = zeros([1, 4, 3, 16], ScalarType.Float32, Dev);
        var cos = ones([3, 16], ScalarType.Float32, Dev);
        var partial = ones([3, 8], ScalarType.Float32, Dev);
        Assert.False(RotaryEmbedding.FusesWithRepeat(q, partial, partial));
        Assert.False(RotaryEmbedding.FusesWithRepeat(q.to(ScalarType.Float64), cos, cos));
        Assert.Equal(Dev.type == DeviceType.CUDA && FX.Fused.Rope && FX.FusedRopeGqa, RotaryEmbedding.FusesWithRepeat(q, cos, cos));
    }
}
