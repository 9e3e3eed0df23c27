using LoRAHub.Models.Generation;
using LoRAHub.Models.Llama;
using LoRAHub.Plugins.LoRA;
using LoRAHub.Tuners.Lora;

namespace LoRAHub.Models.Tests;

/// <summary>The families' structure and math without transformers: names, shapes, norms, soft-capping, windows, routing.</summary>
public sealed class FamilyTests
{
    private static LlamaConfig Config(string modelType, Action<LlamaConfig>? edit = null)
    {
        var c = TinyModels.LlamaConfig();
        c.ModelType = modelType;
        c.HeadDimOverride = 8;
        if (modelType is "gemma2" or "gemma3_text") c.TieWordEmbeddings = true;
        if (modelType == "mixtral") c.NumLocalExperts = 4;
        edit?.Invoke(c);
        c.Validate();
        return c;
    }

    private static LlamaForCausalLM Model(LlamaConfig config, long seed = 0)
    {
        var m = LlamaForCausalLM.CreateRandom(config, ScalarType.Float32, TinyModels.Device, seed);
        m.eval();
        return m;
    }

    private static Tensor RandomIds(int batch, int length, int seed)
    {
        var g = new Random(seed);
        var ids = new long[batch, length];
        for (var b = 0; b < batch; b++)
            for (var t = 0; t < length; t++) ids[b, t] = g.Next(3, 64);
        return TinyModels.Ids(ids);
    }

    [Theory]
    [InlineData("qwen3", "model.layers.0.self_attn.q_norm.weight", 8)]
    [InlineData("qwen3", "model.layers.1.self_attn.k_norm.weight", 8)]
    [InlineData("gemma2", "model.layers.0.pre_feedforward_layernorm.weight", 32)]
    [InlineData("gemma3_text", "model.layers.1.post_feedforward_layernorm.weight", 32)]
    [InlineData("gemma3_text", "model.layers.0.self_attn.q_norm.weight", 8)]
    [InlineData("phi3", "model.layers.0.self_attn.qkv_proj.weight", (4 + 2 * 2) * 8)]
    [InlineData("phi3", "model.layers.0.mlp.gate_up_proj.weight", 2 * 64)]
    [InlineData("mixtral", "model.layers.1.block_sparse_moe.gate.weight", 4)]
    [InlineData("mixtral", "model.layers.0.block_sparse_moe.experts.3.w2.weight", 32)]
    public void Families_have_transformers_module_names(string modelType, string key, long rows)
    {
        using var model = Model(Config(modelType));
        var state = model.state_dict();
        Assert.True(state.ContainsKey(key), $"{modelType}: no '{key}' among {string.Join(", ", state.Keys.Take(12))}");
        Assert.Equal(rows, state[key].size(0));
        if (modelType == "phi3") Assert.DoesNotContain("model.layers.0.self_attn.q_proj.weight", state.Keys);
        if (modelType == "mixtral") Assert.DoesNotContain("model.layers.0.mlp.gate_proj.weight", state.Keys);
        if (modelType.StartsWith("gemma")) Assert.DoesNotContain("lm_head.weight", state.Keys);
        using var scope = torch.NewDisposeScope();
        Assert.Equal([2L, 7, 64], model.forward(RandomIds(2, 7, 1)).shape);
    }

    [Fact]
    public void Config_json_of_each_family_parses_with_its_defaults()
    {
        var gemma3 = LlamaConfig.FromJson("""
            {"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 4, "rope_theta": 1000000.0,
             "rope_local_base_freq": 10000.0}
            """);
        Assert.True(gemma3.TieWordEmbeddings); // Gemma's class default, which transformers leaves out of config.json
        Assert.Equal("gelu_pytorch_tanh", gemma3.Activation);
        Assert.Equal(1 / Math.Sqrt(256), gemma3.AttentionScale, 12); // query_pre_attn_scalar defaults to 256
        Assert.Equal([4, 4, 4, 4, 4, null], Enumerable.Range(0, 6).Select(gemma3.WindowOf)); // every 6th layer global
        Assert.Equal(10000.0, gemma3.SlidingRopeTheta);

        // transformers 5 keys rope parameters by layer type.
        var v5 = LlamaConfig.FromJson("""
            {"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "head_dim": 8, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
             "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
            """);
        Assert.Equal(1e6, v5.RopeTheta);
        Assert.Equal("linear", v5.RopeScaling!.Kind);
        Assert.Equal(10000.0, v5.SlidingRopeTheta);
        Assert.Equal([4, null], Enumerable.Range(0, 2).Select(v5.WindowOf));

        var gemma2 = Config("gemma2", c => c.SlidingWindow = 5);
        Assert.Equal([5, null], Enumerable.Range(0, 2).Select(gemma2.WindowOf)); // first layer local, then alternating
        var mistral = LlamaConfig.FromJson("""{"model_type": "mistral", "sliding_window": 4096}""");
        Assert.False(mistral.TieWordEmbeddings);
        Assert.Equal(4096, mistral.WindowOf(31));
        var qwen = LlamaConfig.FromJson("""{"model_type": "qwen3", "num_hidden_layers": 4, "sliding_window": 8, "use_sliding_window": true, "max_window_layers": 2}""");
        Assert.Equal([null, null, 8, 8], Enumerable.Range(0, 4).Select(qwen.WindowOf));
        Assert.Null(LlamaConfig.FromJson("""{"model_type": "qwen3", "sliding_window": 8}""").WindowOf(0)); // use_sliding_window off
    }

    [Theory]
    [InlineData("gemma3", "gemma3_text")]
    [InlineData("bert", "mixtral")]
    [InlineData("phi", "phi3")]
    public void Unsupported_model_types_are_refused_naming_the_supported_ones(string modelType, string listed)
    {
        var e = Assert.ThrowsAny<Exception>(() => LlamaConfig.FromJson($$"""{"model_type": "{{modelType}}"}"""));
        Assert.Contains($"'{modelType}'", e.Message);
        Assert.Contains(listed, e.Message);
        var bad = Assert.Throws<InvalidDataException>(() => LlamaConfig.FromJson("""{"model_type": "phi3", "rope_scaling": {"type": "longrope"}}"""));
        Assert.Contains("longrope", bad.Message);
    }

    [Fact]
    public void Gemma_norm_scales_by_one_plus_weight_in_fp32()
    {
        using var scope = torch.NewDisposeScope();
        using var norm = new GemmaRMSNorm(4, 1e-6);
        using (torch.no_grad()) norm.weight.copy_(torch.tensor(new float[] { 0f, 1f, -0.5f, 2f }));
        var x = new float[] { 1, -2, 3, 4 };
        var y = norm.forward(torch.tensor(x)).data<float>().ToArray();
        var rms = Math.Sqrt(x.Select(v => v * v).Average() + 1e-6);
        double[] scale = [1, 2, 0.5, 3];
        for (var i = 0; i < 4; i++) Assert.Equal(x[i] / rms * scale[i], y[i], 5);
    }

    [Fact]
    public void Gemma_embeddings_are_scaled_by_sqrt_hidden()
    {
        using var scope = torch.NewDisposeScope();
        using var model = Model(Config("gemma2"));
        var ids = TinyModels.Ids(new long[,] { { 5, 9 } });
        var expected = model.model.embed_weight.index_select(0, ids.view(-1)) * Math.Sqrt(32);
        Assert.True(TinyModels.MaxAbsDiff(model.model.embed(ids).view(2, 32), expected) < 1e-5f);
    }

    [Fact]
    public void Soft_capped_attention_matches_a_hand_computation()
    {
        using var scope = torch.NewDisposeScope();
        const double cap = 0.5, scale = 0.7;
        var q = torch.tensor(new float[] { 1, 2, -1, 0.5f, 2, -2 }, [1, 1, 3, 2]);
        var k = torch.tensor(new float[] { 0.5f, 1, -1, 2, 3, 0 }, [1, 1, 3, 2]);
        var v = torch.tensor(new float[] { 1, 0, 0, 1, 2, 3 }, [1, 1, 3, 2]);
        var y = MaskedAttention.Forward(q, k, v, null, null, cap, scale).data<float>().ToArray();
        float[] qa = q.data<float>().ToArray(), ka = k.data<float>().ToArray(), va = v.data<float>().ToArray();
        for (var i = 0; i < 3; i++)
        {
            // Query i sees keys 0..i; each score capped as cap·tanh(s/cap) before the softmax.
            var s = Enumerable.Range(0, i + 1).Select(j => cap * Math.Tanh((qa[2 * i] * ka[2 * j] + qa[2 * i + 1] * ka[2 * j + 1]) * scale / cap)).ToArray();
            var e = s.Select(Math.Exp).ToArray();
            for (var d = 0; d < 2; d++)
            {
                var want = Enumerable.Range(0, i + 1).Sum(j => e[j] * va[2 * j + d]) / e.Sum();
                Assert.Equal(want, y[2 * i + d], 5);
            }
        }
    }

    [Fact]
    public void Sliding_window_mask_keeps_the_last_W_positions()
    {
        using var scope = torch.NewDisposeScope();
        // 3 new queries at positions 4, 5, 6 over 7 keys, window 3: position p sees p-2..p.
        var mask = MaskedAttention.CausalMask(3, 7, 3, torch.CPU).to(ScalarType.Int32).data<int>().ToArray();
        int[] expected = [0, 0, 1, 1, 1, 0, 0, /**/ 0, 0, 0, 1, 1, 1, 0, /**/ 0, 0, 0, 0, 1, 1, 1];
        Assert.Equal(expected, mask);
    }

    // The reference: the same weights without a window, attending through an explicit eager softmax with the window masked by hand.
    private static AttentionFunction ExplicitWindow(int window) => (q, k, v, padding) =>
    {
        using var scope = torch.NewDisposeScope();
        long t = q.size(2), s = k.size(2);
        var scores = torch.matmul(q, k.transpose(-2, -1)) / Math.Sqrt(q.size(-1));
        var allowed = new bool[t * s];
        for (var i = 0; i < t; i++)
            for (var j = 0; j < s; j++)
            {
                var p = s - t + i;
                allowed[i * s + j] = j <= p && j > p - window && (padding is null || padding[0, j].item<long>() != 0);
            }
        var mask = torch.tensor(allowed, [t, s], device: q.device);
        scores = scores.masked_fill(mask.logical_not(), double.NegativeInfinity);
        return torch.matmul(torch.nn.functional.softmax(scores, -1), v).MoveToOuterDisposeScope();
    };

    [Theory]
    [InlineData("mistral")]
    [InlineData("phi3")]
    public void Sliding_window_attention_equals_explicit_masking_in_training_and_cached_generation(string modelType)
    {
        const int window = 4;
        using var scope = torch.NewDisposeScope();
        using var windowed = Model(Config(modelType, c => c.SlidingWindow = window), seed: 3);
        // The same weights (copied: seeding is process-wide and other tests draw random numbers in parallel).
        LlamaForCausalLM Unwindowed()
        {
            var m = Model(Config(modelType));
            m.load_state_dict(windowed.state_dict());
            return m;
        }
        using var reference = Unwindowed();
        reference.Attention = ExplicitWindow(window);
        var ids = RandomIds(2, 11, 5);
        Assert.True(TinyModels.MaxAbsDiff(windowed.Forward(ids), reference.Forward(ids)) < 1e-5f);
        using var full = Unwindowed();
        Assert.True(TinyModels.MaxAbsDiff(windowed.Forward(ids), full.Forward(ids)) > 1e-3f, "the window should change the logits");

        // Training: the loss (and so its gradient) is the reference's.
        windowed.train();
        reference.train();
        Assert.Equal(reference.ComputeLoss(ids, ids).item<float>(), windowed.ComputeLoss(ids, ids).item<float>(), 5);

        // Generation past the window: the cache keeps every position and the mask hides the old ones.
        windowed.eval();
        reference.eval();
        var options = new GenerationOptions { MaxNewTokens = 12 };
        var cached = TextGenerator.Generate(windowed, [[5, 9, 13, 2, 40, 7]], options)[0];
        Assert.Equal(TextGenerator.Generate(windowed, [[5, 9, 13, 2, 40, 7]], options with { UseCache = false })[0], cached);
        Assert.Equal(TextGenerator.Generate(reference, [[5, 9, 13, 2, 40, 7]], options with { UseCache = false })[0], cached);
    }

    [Fact]
    public void One_layer_window_ignores_tokens_W_or_more_positions_back()
    {
        using var scope = torch.NewDisposeScope();
        using var model = Model(Config("mistral", c => { c.SlidingWindow = 3; c.NumHiddenLayers = 1; }));
        var a = new long[,] { { 5, 9, 13, 2, 40, 7, 8 } };
        var far = (long[,])a.Clone();
        far[0, 3] = 50;  // 3 positions before the last: outside its window
        var near = (long[,])a.Clone();
        near[0, 4] = 50; // 2 positions before: inside
        Tensor last(long[,] x) => model.Forward(TinyModels.Ids(x)).narrow(1, 6, 1);
        Assert.True(TinyModels.MaxAbsDiff(last(a), last(far)) < 1e-6f);
        Assert.True(TinyModels.MaxAbsDiff(last(a), last(near)) > 1e-4f);
    }

    [Fact]
    public void Gemma_layers_with_soft_caps_and_local_rope_decode_the_same_with_and_without_cache()
    {
        foreach (var type in new[] { "gemma2", "gemma3_text" })
        {
            using var model = Model(Config(type, c =>
            {
                c.SlidingWindow = 3;
                c.AttnLogitSoftcapping = type == "gemma2" ? 1.0 : null;
                c.FinalLogitSoftcapping = type == "gemma2" ? 2.0 : null;
                c.QueryPreAttnScalar = 12;
                c.SlidingRopeTheta = type == "gemma3_text" ? 100.0 : null;
            }), seed: 4);
            int[][] prompts = [[5, 9, 13, 2], [4, 8, 60, 33, 12, 6]];
            var options = new GenerationOptions { MaxNewTokens = 8 };
            Assert.Equal(TextGenerator.Generate(model, prompts, options with { UseCache = false }), TextGenerator.Generate(model, prompts, options));
            using var scope = torch.NewDisposeScope();
            if (type == "gemma2") Assert.True(model.Forward(RandomIds(1, 6, 2)).abs().max().item<float>() <= 2.0f, "final logits are capped at 2");
        }
    }

    [Fact]
    public void Gradient_checkpointing_gives_the_same_gradients_with_local_and_global_rope_layers()
    {
        using var scope = torch.NewDisposeScope();
        using var model = Model(Config("gemma3_text", c => { c.SlidingWindow = 3; c.SlidingRopeTheta = 100.0; }), seed: 9);
        model.train();
        var ids = RandomIds(2, 7, 4);
        Dictionary<string, Tensor> Grads(bool checkpointing)
        {
            model.GradientCheckpointing = checkpointing;
            model.zero_grad();
            model.ComputeLoss(ids, ids).backward();
            return model.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.clone());
        }
        var plain = Grads(false);
        var recomputed = Grads(true);
        foreach (var (name, g) in plain) Assert.True(TinyModels.MaxAbsDiff(g, recomputed[name]) < 1e-5f, name);
    }

    [Fact]
    public void Partial_rotary_rotates_only_the_leading_dimensions()
    {
        using var scope = torch.NewDisposeScope();
        var config = new LlamaConfig { HiddenSize = 8, NumAttentionHeads = 1, PartialRotaryFactor = 0.5 };
        var (cos, sin) = RotaryEmbedding.Tables(config, 3, torch.CPU);
        Assert.Equal(4, cos.size(-1));
        var x = torch.arange(1, 9, ScalarType.Float32).view(1, 1, 1, 8);
        var y = RotaryEmbedding.Apply(x, cos.narrow(0, 2, 1), sin.narrow(0, 2, 1));
        Assert.True(TinyModels.MaxAbsDiff(y.narrow(-1, 4, 4), x.narrow(-1, 4, 4)) == 0);
        Assert.True(TinyModels.MaxAbsDiff(y.narrow(-1, 0, 4), x.narrow(-1, 0, 4)) > 0.1f);
    }

    [Fact]
    public void Top_k_routing_matches_a_hand_computation()
    {
        using var scope = torch.NewDisposeScope();
        double[] logits = [1.0, 3.0, 0.5, 2.0];
        var (weights, experts) = MixtralSparseMoeBlock.Route(torch.tensor(logits.Select(x => (float)x).ToArray(), [1, 4]), 2);
        Assert.Equal([1L, 3], experts.data<long>().ToArray()); // the two largest, largest first
        var e = logits.Select(Math.Exp).ToArray();
        // softmax then renormalised over the chosen two: e1/(e1+e3), e3/(e1+e3)
        var w = weights.data<float>().ToArray();
        Assert.Equal(e[1] / (e[1] + e[3]), w[0], 6);
        Assert.Equal(e[3] / (e[1] + e[3]), w[1], 6);
    }

    [Fact]
    public void Moe_block_equals_the_per_token_sum_of_its_chosen_experts()
    {
        using var scope = torch.NewDisposeScope();
        using var model = Model(Config("mixtral"), seed: 2);
        var block = model.model.layers[0].moe!;
        var x = torch.randn(2, 5, 32, generator: new torch.Generator(7)).to(TinyModels.Device);
        var y = block.forward(x).view(10, 32);
        var flat = x.view(10, 32);
        var gate = ((TorchSharp.Modules.Linear)block.get_submodule("gate")!).weight!;
        var (weights, chosen) = MixtralSparseMoeBlock.Route(torch.nn.functional.linear(flat, gate), 2);
        for (var t = 0; t < 10; t++)
        {
            var want = torch.zeros(32, device: TinyModels.Device);
            for (var j = 0; j < 2; j++)
                want += block.experts[(int)chosen[t, j].item<long>()].forward(flat.narrow(0, t, 1)).view(32) * weights[t, j];
            Assert.True(TinyModels.MaxAbsDiff(want, y[t]) < 1e-5f, $"token {t}");
        }
    }

    [Fact]
    public void Load_balancing_loss_matches_a_hand_computation()
    {
        using var scope = torch.NewDisposeScope();
        // 3 tokens, 2 experts, top-1: choices e0, e1, e0.
        double[,] l = { { 2, 0 }, { 0, 1 }, { 1, 0 } };
        var probs = Enumerable.Range(0, 3).Select(t => { var a = Math.Exp(l[t, 0]); var b = Math.Exp(l[t, 1]); return new[] { a / (a + b), b / (a + b) }; }).ToArray();
        double[] share = [2.0 / 3, 1.0 / 3];
        var meanProb = new[] { probs.Average(p => p[0]), probs.Average(p => p[1]) };
        var expected = 2 * (share[0] * meanProb[0] + share[1] * meanProb[1]);
        var logits = torch.tensor(new float[] { 2, 0, 0, 1, 1, 0 }, [3, 2]);
        Assert.Equal(expected, RouterLoss.LoadBalancing([logits], 2, 1).item<float>(), 5);
        // A padding token (mask 0) is left out: the last token masked gives f = [1/2, 1/2] over the first two.
        var masked = 2 * (0.5 * (probs[0][0] + probs[1][0]) / 2 + 0.5 * (probs[0][1] + probs[1][1]) / 2);
        var mask = torch.tensor(new long[] { 1, 1, 0 }, [1, 3]);
        Assert.Equal(masked, RouterLoss.LoadBalancing([logits], 2, 1, mask).item<float>(), 5);
    }

    [Fact]
    public void Mixtral_training_loss_adds_the_router_loss_and_lora_reaches_the_experts()
    {
        using var scope = torch.NewDisposeScope();
        using var model = Model(Config("mixtral"), seed: 1);
        var ids = RandomIds(2, 6, 3);
        var evalLoss = model.ComputeLoss(ids, ids).item<float>();
        Assert.Null(model.LastRouterAuxLoss); // eval without output_router_logits: the plain LM loss, as transformers
        using var adapter = new LoraMethod().Attach(model, new LoraOptions
        {
            R = 2, LoraAlpha = 4, InitLoraWeights = LoraInit.Gaussian, TargetModules = new[] { "w1", "w2", "w3", "q_proj" },
        });
        Assert.Contains(adapter.StateDict().Keys, k => k.Contains("block_sparse_moe.experts.3.w2.lora_B"));
        model.train();
        var loss = model.ComputeLoss(ids, ids);
        var aux = model.LastRouterAuxLoss!.Value;
        Assert.InRange(aux, 1.0f, 4.0f); // k = 2 for uniform routing; between 1 and E·… for any routing
        Assert.Equal(evalLoss + 0.001f * aux, loss.item<float>(), 4);
        loss.backward();
        // B starts at zero (so A's gradient is zero too); B's is not, for an expert that got tokens.
        var expertB = Enumerable.Range(0, 4).Select(e => model.named_parameters().First(p => p.name.Contains($"experts.{e}.w1.lora_B")).parameter);
        Assert.Contains(expertB, b => b.grad is not null && b.grad.abs().sum().item<float>() > 0);
    }

    [Fact]
    public void Phi3_fused_projections_take_lora_as_single_modules()
    {
        using var scope = torch.NewDisposeScope();
        using var model = Model(Config("phi3"));
        using var adapter = new LoraMethod().Attach(model, new LoraOptions
        {
            R = 2, LoraAlpha = 4, InitLoraWeights = LoraInit.Gaussian, TargetModules = new[] { "qkv_proj", "gate_up_proj" },
        });
        var keys = adapter.StateDict().Keys.ToList();
        Assert.Contains("base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight", keys.Select(k => k.Replace(".default", "")));
        Assert.Equal([(4 + 2 * 2) * 8L, 2], adapter.StateDict().First(kv => kv.Key.Contains("qkv_proj.lora_B")).Value.shape);
    }

    [Theory]
    [InlineData("qwen3")]
    [InlineData("gemma2")]
    [InlineData("gemma3_text")]
    [InlineData("phi3")]
    [InlineData("mixtral")]
    public void Saved_folder_loads_back_with_the_same_logits(string modelType)
    {
        var folder = TinyModels.TempFolder();
        try
        {
            using var scope = torch.NewDisposeScope();
            using var model = Model(Config(modelType, c => c.SlidingWindow = 3), seed: 6);
            PretrainedModel.Save(model, folder);
            using var loaded = PretrainedModel.LoadLlama(folder, ScalarType.Float32, TinyModels.Device);
            Assert.Equal(modelType, loaded.ModelType);
            var ids = RandomIds(2, 7, 9);
            Assert.True(TinyModels.MaxAbsDiff(model.Forward(ids), loaded.Forward(ids)) < 1e-6f);
        }
        finally
        {
            Directory.Delete(folder, true);
        }
    }
}

/// <summary>Mixtral folders in transformers 5's fused-experts layout load into our per-expert Linear modules.</summary>
public sealed class MixtralCheckpointTests
{
    [Fact]
    public void Fused_experts_checkpoint_loads_with_the_same_logits()
    {
        var folder = TinyModels.TempFolder();
        try
        {
            using var scope = torch.NewDisposeScope();
            var config = TinyModels.LlamaConfig("mixtral");
            config.NumLocalExperts = 3;
            using var model = LlamaForCausalLM.CreateRandom(config, ScalarType.Float32, TinyModels.Device, 8);
            var state = model.state_dict();
            var entries = new List<LoRAHub.Safetensors.SafetensorsEntry>();
            void Add(string key, Tensor t)
            {
                var bytes = t.cpu().contiguous().bytes.ToArray();
                entries.Add(new(key, LoRAHub.Safetensors.SafetensorsDType.F32, t.shape, bytes.Length, s => s.Write(bytes)));
            }
            foreach (var (key, t) in state.Where(kv => !kv.Key.Contains("block_sparse_moe"))) Add(key, t);
            for (var l = 0; l < 2; l++)
            {
                var p = $"model.layers.{l}.block_sparse_moe.";
                Add($"model.layers.{l}.mlp.gate.weight", state[p + "gate.weight"]);
                Add($"model.layers.{l}.mlp.experts.gate_up_proj", torch.stack(Enumerable.Range(0, 3)
                    .Select(e => torch.cat([state[$"{p}experts.{e}.w1.weight"], state[$"{p}experts.{e}.w3.weight"]], 0)).ToArray()));
                Add($"model.layers.{l}.mlp.experts.down_proj", torch.stack(Enumerable.Range(0, 3).Select(e => state[$"{p}experts.{e}.w2.weight"]).ToArray()));
            }
            LoRAHub.Safetensors.SafetensorsWriter.Write(Path.Combine(folder, "model.safetensors"), entries, new Dictionary<string, string> { ["format"] = "pt" });
            File.WriteAllText(Path.Combine(folder, "config.json"), model.ConfigJson());
            using var loaded = PretrainedModel.LoadLlama(folder, ScalarType.Float32, TinyModels.Device);
            var ids = TinyModels.Ids(new long[,] { { 1, 5, 9, 13, 2, 40, 7, 3 } });
            Assert.Equal(0f, TinyModels.MaxAbsDiff(model.Forward(ids), loaded.Forward(ids)));
            using var fourBit = PretrainedModel.LoadIn4bit(folder, new BitsAndBytesConfig { Bnb4bitComputeDtype = ScalarType.Float32 }, ScalarType.Float32, TinyModels.Device);
            Assert.Equal([1L, 8, 64], fourBit.Forward(ids).shape);
        }
        finally
        {
            Directory.Delete(folder, true);
        }
    }
}
