using LoRAHub.Models.Llama;
using LoRAHub.TorchExtensions;
using TorchSharp.Modules;

namespace LoRAHub.Models.Tests;

/// <summary>
/// Llama attention with q/k/v's low-rank updates (and DoRA-style row scales c = m/n) applied inside the rope kernel
/// (<see cref="LoraFusion.TryQkvRope"/>) against the same model with that path switched off (the fused q/k/v block's
/// addmm and row-scale passes, then the rope kernel): logits and the gradients of every A, B and m, grouped and equal
/// head counts, bf16 and fp32. On CUDA (LORAHUB_TEST_DEVICE=cuda) the path runs once per layer; on the CPU the attention
/// declines it ("kernel unavailable").
/// </summary>
[Collection(RunsAlone.Name)]
public sealed class LoraQkvRopeAttentionTests
{
    // Alone: it switches the path process-wide and counts its blocks.

    private static readonly Device Dev = TinyModels.Device;

    /// <summary>A frozen Linear with a rank-r update computed as LoRA's layer does, and optionally a row scale m/n.</summary>
    private sealed class Adapted : nn.Module<Tensor, Tensor>, ILowRankLinear
    {
        private readonly Tensor weight;
        private readonly Parameter a, b;
        private readonly Parameter? m;
        private readonly Tensor? n;
        private readonly double scale;

        public Adapted(Tensor weight, int rank, bool rowScale, Generator gen) : base("Adapted")
        {
            this.weight = weight.detach();
            long outF = weight.size(0), inF = weight.size(1);
            a = new Parameter((randn([rank, inF], generator: gen) / Math.Sqrt(inF)).to(Dev));
            b = new Parameter((randn([outF, rank], generator: gen) * 0.2).to(Dev));
            scale = 2.0 / rank;
            if (rowScale)
            {
                m = new Parameter((1 + 0.3 * randn([outF], generator: gen)).to(Dev));
                n = (1 + rand([outF], generator: gen)).to(Dev);
            }
            RegisterComponents();
        }

        public IEnumerable<Parameter> Trainable() => new[] { a, b, m }.OfType<Parameter>();

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            var y = nn.functional.linear(x, weight);
            var xa = nn.functional.linear(x, a.to(x.dtype));
            y = torchx.addmm(y.reshape(-1, y.size(-1)), xa.reshape(-1, xa.size(-1)), b.to(x.dtype).t(), 1, scale).view(y.shape);
            if (m is not null) y = (y.to(ScalarType.Float32) * (m / n!)).to(x.dtype);
            return y.MoveToOuterDisposeScope();
        }

        public LowRankParts? low_rank_parts(out string reason)
        {
            reason = "";
            var (mm, nn) = (m, n);
            return new LowRankParts(weight, null, a, b, scale)
            {
                DividedRowScale = mm is null ? null : () => ((mm / nn!).detach(), mm, nn!),
            };
        }
    }

    [Theory]
    [InlineData(8, 2, ScalarType.BFloat16, false)]
    [InlineData(8, 2, ScalarType.BFloat16, true)]
    [InlineData(4, 4, ScalarType.BFloat16, true)]
    [InlineData(8, 2, ScalarType.Float32, true)]
    public void Logits_and_gradients_match_the_path_switched_off(int heads, int kvHeads, ScalarType dtype, bool rowScale)
    {
        var config = TinyModels.LlamaConfig();
        config.HiddenSize = 128;
        config.IntermediateSize = 128;
        config.NumAttentionHeads = heads;
        config.NumKeyValueHeads = kvHeads;
        using var model = LlamaForCausalLM.CreateRandom(config, dtype, Dev, seed: 7);
        foreach (var p in model.parameters()) p.requires_grad = false;
        var gen = new Generator(13);
        var trainable = new List<Parameter>();
        for (var layer = 0; layer < config.NumHiddenLayers; layer++)
            foreach (var proj in new[] { "q_proj", "k_proj", "v_proj" })
            {
                var path = $"model.layers.{layer}.self_attn.{proj}";
                var linear = (Linear)model.named_modules().First(m => m.name == path).module;
                var adapted = new Adapted(linear.weight!, 16, rowScale, gen);
                trainable.AddRange(adapted.Trainable());
                model.replace_submodule(path, adapted);
            }
        model.train();
        var random = new Random(11);
        long b = 2, t = 40;
        var ids = tensor(Enumerable.Range(0, (int)(b * t)).Select(_ => (long)random.Next(1, 64)).ToArray(), [b, t], device: Dev);
        var upstream = tensor(Enumerable.Range(0, (int)(b * t * 64)).Select(_ => (float)(random.NextDouble() * 2 - 1)).ToArray(), [b, t, 64], device: Dev);
        if (Dev.type != DeviceType.CUDA)
        {
            // No kernel here: the attention declines the path and says why (one forward is enough to see it).
            var was = LoraFusion.QkvRope;
            LoraFusion.QkvRope = true;
            try
            {
                using (no_grad()) model.Forward(ids).Dispose();
            }
            finally
            {
                LoraFusion.QkvRope = was;
            }
            Assert.Equal("kernel unavailable", LoraFusion.QkvRopeDeclined);
            return;
        }
        var results = new List<(Tensor logits, Tensor[] grads)>();
        var (enabled, rowScales) = (LoraFusion.QkvRope, LoraFusion.QkvRopeRowScales);
        LoraFusion.QkvRopeRowScales = true;
        try
        {
            foreach (var on in new[] { true, false })
            {
                LoraFusion.QkvRope = on;
                using var scope = NewDisposeScope();
                foreach (var p in trainable) p.grad = null;
                var before = LoraFusion.QkvRopeCount;
                var logits = model.Forward(ids);
                (logits.to(ScalarType.Float32) * upstream).sum().backward();
                var fused = on && torchx.nn.functional.Fused.LoraQkv && torchx.nn.functional.Fused.Rope;
                Assert.True(before + (fused ? config.NumHiddenLayers : 0) == LoraFusion.QkvRopeCount, LoraFusion.QkvRopeEpilogue);
                results.Add((logits.detach().to(ScalarType.Float32).cpu().DetachFromDisposeScope(),
                    trainable.Select(p => p.grad!.to(ScalarType.Float32).cpu().DetachFromDisposeScope()).ToArray()));
            }
        }
        finally
        {
            (LoraFusion.QkvRope, LoraFusion.QkvRopeRowScales) = (enabled, rowScales);
        }
        // Relative L2 errors: fp32 at rounding level; bf16 one rounding fewer per projection, through two layers.
        var tol = dtype == ScalarType.Float32 ? 1e-4 : 3e-2;
        Assert.True(RelativeError(results[0].logits, results[1].logits) < tol, $"logits: {RelativeError(results[0].logits, results[1].logits)}");
        for (var i = 0; i < trainable.Count; i++)
        {
            var e = RelativeError(results[0].grads[i], results[1].grads[i]);
            Assert.True(e < tol, $"gradient of trainable tensor {i} ({trainable[i].shape.Length}-d): relative error {e}");
        }
    }

    private static double RelativeError(Tensor a, Tensor b) =>
        (a - b).norm().item<float>() / Math.Max(b.norm().item<float>(), 1e-12);
}
