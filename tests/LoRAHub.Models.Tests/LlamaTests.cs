using LoRAHub.Models.Generation;
using LoRAHub.Models.Llama;

namespace LoRAHub.Models.Tests;

using F = torch.nn.functional;

public sealed class LlamaTests
{
    private static readonly long[,] Prompt = { { 1, 5, 9, 13, 2, 40, 7, 3 }, { 4, 4, 8, 60, 33, 12, 6, 1 } };

    [Fact]
    public void Forward_gives_batch_seq_vocab_logits_and_transformers_names()
    {
        using var scope = torch.NewDisposeScope();
        using var model = TinyModels.Llama();
        var logits = model.forward(TinyModels.Ids(Prompt));
        Assert.Equal([2L, 8, 64], logits.shape);
        var keys = model.state_dict().Keys.ToHashSet();
        Assert.Contains("model.embed_tokens.weight", keys);
        Assert.Contains("model.layers.1.self_attn.k_proj.weight", keys);
        Assert.Contains("model.layers.0.mlp.down_proj.weight", keys);
        Assert.Contains("model.layers.0.post_attention_layernorm.weight", keys);
        Assert.Contains("model.norm.weight", keys);
        Assert.Contains("lm_head.weight", keys);
        Assert.Equal([16L, 32], model.state_dict()["model.layers.0.self_attn.k_proj.weight"].shape); // 2 kv heads × 8
    }

    [Fact]
    public void Tied_model_has_no_lm_head_and_qwen2_has_qkv_bias_only()
    {
        using var tied = TinyModels.Llama(tied: true);
        Assert.DoesNotContain("lm_head.weight", tied.state_dict().Keys);
        using var qwen = TinyModels.Llama("qwen2");
        var keys = qwen.state_dict().Keys.ToHashSet();
        Assert.Contains("model.layers.0.self_attn.q_proj.bias", keys);
        Assert.Contains("model.layers.0.self_attn.v_proj.bias", keys);
        Assert.DoesNotContain("model.layers.0.self_attn.o_proj.bias", keys);
        Assert.DoesNotContain("model.layers.0.mlp.up_proj.bias", keys);
    }

    [Fact]
    public void Changing_a_later_token_leaves_earlier_logits_unchanged()
    {
        using var scope = torch.NewDisposeScope();
        using var model = TinyModels.Llama();
        var changed = (long[,])Prompt.Clone();
        changed[0, 6] = 50;
        var a = model.forward(TinyModels.Ids(Prompt));
        var b = model.forward(TinyModels.Ids(changed));
        Assert.True(TinyModels.MaxAbsDiff(a.narrow(1, 0, 6), b.narrow(1, 0, 6)) < 1e-6f);
        Assert.True(TinyModels.MaxAbsDiff(a.narrow(1, 6, 1), b.narrow(1, 6, 1)) > 1e-4f);
    }

    [Fact]
    public void Cached_greedy_generation_equals_recomputing_everything()
    {
        using var model = TinyModels.Llama();
        int[][] prompts = [[1, 5, 9, 13], [4, 8, 60, 33, 12, 6]];
        var options = new GenerationOptions { MaxNewTokens = 8 };
        var cached = TextGenerator.Generate(model, prompts, options);
        var recomputed = TextGenerator.Generate(model, prompts, options with { UseCache = false });
        Assert.Equal(recomputed, cached);
        // Left padding in a batch gives the same tokens as generating each prompt alone.
        Assert.Equal(TextGenerator.Generate(model, [prompts[0]], options)[0], cached[0]);
        Assert.Equal(TextGenerator.Generate(model, [prompts[1]], options)[0], cached[1]);
    }

    [Fact]
    public void Stop_tokens_end_a_sequence_and_sampling_is_seeded()
    {
        using var model = TinyModels.Llama();
        var greedy = TextGenerator.Generate(model, [[1, 2, 3]], new GenerationOptions { MaxNewTokens = 6 })[0];
        var stopped = TextGenerator.Generate(model, [[1, 2, 3]], new GenerationOptions { MaxNewTokens = 6, StopTokenIds = [greedy[1]] })[0];
        Assert.Equal(greedy.Take(Array.IndexOf(greedy, greedy[1]) + 1), stopped);
        var sampling = new GenerationOptions { MaxNewTokens = 6, Temperature = 1.0, TopK = 10, TopP = 0.9, Seed = 7 };
        Assert.Equal(TextGenerator.Generate(model, [[1, 2, 3]], sampling), TextGenerator.Generate(model, [[1, 2, 3]], sampling));
    }

    [Fact]
    public void Chunked_loss_equals_cross_entropy_over_full_logits()
    {
        using var scope = torch.NewDisposeScope();
        using var model = TinyModels.Llama();
        var ids = TinyModels.Ids(Prompt);
        var labels = TinyModels.Ids(new long[,] { { -100, -100, 9, 13, 2, 40, 7, 3 }, { 4, 4, 8, -100, 33, 12, 6, 1 } });
        var loss = model.ComputeLoss(ids, labels);
        var logits = model.forward(ids).narrow(1, 0, 7).reshape(-1, 64);
        var expected = F.cross_entropy(logits, labels.narrow(1, 1, 7).reshape(-1));
        Assert.True(Math.Abs(loss.item<float>() - expected.item<float>()) < 1e-5f, $"{loss.item<float>()} vs {expected.item<float>()}");
    }

    [Fact]
    public void Rope_matches_hand_computed_rotation()
    {
        using var scope = torch.NewDisposeScope();
        var config = new LlamaConfig { HiddenSize = 4, NumAttentionHeads = 1, RopeTheta = 10000 };
        // head_dim 4: inv_freq = [1, 10000^(-1/2)] = [1, 0.01]
        Assert.Equal([1.0, 0.01], RotaryEmbedding.InverseFrequencies(config).Select(f => Math.Round(f, 12)));
        var (cos, sin) = RotaryEmbedding.Tables(config, 3, TinyModels.Device);
        var x = torch.tensor(new float[] { 1, 2, 3, 4 }, [1, 1, 1, 4], device: TinyModels.Device);
        var y = RotaryEmbedding.Apply(x, cos.narrow(0, 2, 1), sin.narrow(0, 2, 1)).reshape(4).cpu().data<float>().ToArray();
        // Position 2, angles (2, 0.02); rotate_half pairs dimension i with i + 2: (1, 3) and (2, 4).
        double c0 = Math.Cos(2), s0 = Math.Sin(2), c1 = Math.Cos(0.02), s1 = Math.Sin(0.02);
        double[] expected = [1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1];
        for (var i = 0; i < 4; i++) Assert.True(Math.Abs(expected[i] - y[i]) < 1e-5, $"dim {i}: {y[i]} vs {expected[i]}");
    }

    [Fact]
    public void Llama3_rope_scaling_follows_the_formula()
    {
        var config = new LlamaConfig
        {
            HiddenSize = 8, NumAttentionHeads = 1, RopeTheta = 10000,
            RopeScaling = new RopeScaling { RopeType = "llama3", Factor = 8, LowFreqFactor = 1, HighFreqFactor = 4, OriginalMaxPositionEmbeddings = 64 },
        };
        // inv_freq = [1, 0.1, 0.01, 0.001]; wavelengths 2π/f; high-frequency cut 64/4 = 16, low-frequency cut 64/1 = 64.
        var smooth = (64 / (2 * Math.PI / 0.1) - 1) / (4 - 1.0); // 0.1 has wavelength 62.8: between the cuts
        double[] expected = [1.0, (1 - smooth) * 0.1 / 8 + smooth * 0.1, 0.01 / 8, 0.001 / 8];
        var actual = RotaryEmbedding.InverseFrequencies(config);
        for (var i = 0; i < 4; i++) Assert.True(Math.Abs(expected[i] - actual[i]) < 1e-12, $"{i}: {actual[i]} vs {expected[i]}");
    }

    [Fact]
    public void Config_json_round_trips_through_transformers_names()
    {
        var config = TinyModels.LlamaConfig("mistral");
        config.RopeScaling = new RopeScaling { RopeType = "llama3", Factor = 8 };
        var json = config.ToJson();
        Assert.Contains("\"num_key_value_heads\": 2", json);
        Assert.Contains("\"MistralForCausalLM\"", json);
        var back = LlamaConfig.FromJson(json);
        Assert.Equal(2, back.KeyValueHeads);
        Assert.Equal("llama3", back.RopeScaling!.Kind);
        var withHeadDim = LlamaConfig.FromJson("""{"model_type":"llama","hidden_size":32,"num_attention_heads":4,"head_dim":16,"eos_token_id":[1,2]}""");
        Assert.Equal(16, withHeadDim.HeadDim);
        Assert.Equal([1, 2], withHeadDim.EosTokenIds);
    }
}

public sealed class PaddingTests
{
    [Theory]
    [InlineData("llama")]
    [InlineData("gpt2")]
    public void Left_padded_rows_and_cached_steps_match_the_unpadded_sequence(string kind)
    {
        using var scope = torch.NewDisposeScope();
        using ICausalLanguageModel model = kind == "gpt2" ? TinyModels.Gpt2() : TinyModels.Llama();
        // Row 0 is [pad, pad, 7, 8, 9]; row 1 is full. Then one cached step appends token 11 to both.
        var ids = TinyModels.Ids(new long[,] { { 0, 0, 7, 8, 9 }, { 3, 4, 5, 6, 7 } });
        var mask = TinyModels.Ids(new long[,] { { 0, 0, 1, 1, 1 }, { 1, 1, 1, 1, 1 } });
        using var cache = new KvCache(model.LayerCount);
        var prefill = model.Forward(ids, mask, cache);
        var step = model.Forward(TinyModels.Ids(new long[,] { { 11 }, { 11 } }), torch.cat([mask, torch.ones([2, 1], ScalarType.Int64, TinyModels.Device)], 1), cache);

        var alone = model.Forward(TinyModels.Ids(new long[,] { { 7, 8, 9, 11 } }));
        Assert.True(TinyModels.MaxAbsDiff(prefill.narrow(0, 0, 1).narrow(1, 2, 3), alone.narrow(1, 0, 3)) < 1e-5f);
        Assert.True(TinyModels.MaxAbsDiff(step.narrow(0, 0, 1), alone.narrow(1, 3, 1)) < 1e-5f);
        var full = model.Forward(TinyModels.Ids(new long[,] { { 3, 4, 5, 6, 7, 11 } }));
        Assert.True(TinyModels.MaxAbsDiff(step.narrow(0, 1, 1), full.narrow(1, 5, 1)) < 1e-5f);
        Assert.False(prefill.isnan().any().item<bool>());
    }
}

public sealed class PluginHookTests
{
    private sealed class CountingLayer(nn.Module<Tensor, Tensor> inner) : nn.Module<Tensor, Tensor>("CountingLayer")
    {
        public int Calls { get; private set; }

        public override Tensor forward(Tensor x)
        {
            Calls++;
            return inner.forward(x);
        }
    }

    [Fact]
    public void A_replaced_projection_is_used_by_forward()
    {
        using var scope = torch.NewDisposeScope();
        using var model = TinyModels.Llama();
        var ids = TinyModels.Ids(new long[,] { { 1, 2, 3 } });
        var before = model.forward(ids);
        var original = (nn.Module<Tensor, Tensor>)model.get_submodule("model.layers.1.mlp.up_proj")!;
        var counting = new CountingLayer(original);
        model.replace_submodule("model.layers.1.mlp.up_proj", counting);
        Assert.True(TinyModels.Equal(model.forward(ids), before));
        Assert.Equal(1, counting.Calls);
    }

    private sealed class ModeRecordingLayer(nn.Module<Tensor, Tensor> inner) : nn.Module<Tensor, Tensor>("ModeRecordingLayer")
    {
        public List<bool> TrainingAtForward { get; } = [];

        public override Tensor forward(Tensor x)
        {
            TrainingAtForward.Add(training);
            return inner.forward(x);
        }
    }

    [Fact]
    public void Generation_runs_in_eval_mode_and_restores_training_mode()
    {
        using var model = TinyModels.Llama();
        var recorder = new ModeRecordingLayer((nn.Module<Tensor, Tensor>)model.get_submodule("model.layers.0.mlp.up_proj")!);
        model.replace_submodule("model.layers.0.mlp.up_proj", recorder);
        model.train();
        TextGenerator.Generate(model, [[1, 2, 3]], new GenerationOptions { MaxNewTokens = 2 });
        Assert.Equal([false, false], recorder.TrainingAtForward);
        Assert.True(model.training);
        Assert.True(recorder.training);
        model.eval();
        TextGenerator.Generate(model, [[1, 2, 3]], new GenerationOptions { MaxNewTokens = 1 });
        Assert.False(model.training);
    }

    [Fact]
    public void Gradient_checkpointing_gives_the_same_gradients()
    {
        using var model = TinyModels.Llama();
        var ids = TinyModels.Ids(new long[,] { { 1, 2, 3, 4, 5, 6 } });
        float[] Grad()
        {
            using var scope = torch.NewDisposeScope();
            foreach (var p in model.parameters()) p.grad = null;
            model.ComputeLoss(ids, ids).backward();
            return model.state_dict()["model.layers.0.self_attn.q_proj.weight"].grad!.data<float>().ToArray();
        }
        var plain = Grad();
        model.GradientCheckpointing = true;
        var checkpointed = Grad();
        Assert.Equal(plain.Length, checkpointed.Length);
        Assert.True(plain.Zip(checkpointed, (a, b) => Math.Abs(a - b)).Max() < 1e-6f);
    }
}
