using LoRAHub.Models.Llama;
using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.LongLoRA.Tests;

/// <summary>The method on a tiny Llama: attention switching, trainable embeddings and norms, training, files.</summary>
public sealed class LongLoraTests
{
    private static readonly LlamaConfig Config = new()
    {
        HiddenSize = 32, IntermediateSize = 64, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
        VocabSize = 50, TieWordEmbeddings = false, RopeTheta = 10000, MaxPositionEmbeddings = 128,
    };

    private static LlamaForCausalLM Model() => LlamaForCausalLM.CreateRandom(Config, seed: 1);

    private static Tensor Ids(long seed)
    {
        torchx.manual_seed(seed);
        return torch.randint(0, Config.VocabSize, [2, 32]);
    }

    private static Tensor Logits(LlamaForCausalLM model, Tensor ids)
    {
        using var _ = torch.no_grad();
        return model.Forward(ids);
    }

    [Fact]
    public void Training_uses_shifted_sparse_attention_and_inference_the_models_own()
    {
        using var scope = torch.NewDisposeScope();
        using var model = Model();
        var ids = Ids(2);
        var baseLogits = Logits(model, ids);
        var original = model.Attention;
        using (var adapter = new LongLoraMethod().Attach(model, new { }))
        {
            Assert.NotSame(original, model.Attention);
            adapter.SetTraining(false);
            Assert.True(Logits(model, ids).allclose(baseLogits, 1e-5, 1e-6), "B = 0 at init and full attention in inference: the base output");
            adapter.SetTraining(true);
            var training = Logits(model, ids);
            // The first group (8 of 32 tokens) sees the same keys either way; later tokens see only their groups.
            Assert.True(training.narrow(1, 0, 4).allclose(baseLogits.narrow(1, 0, 4), 1e-5, 1e-6));
            Assert.False(training.allclose(baseLogits, 1e-3, 1e-3));
            adapter.Enabled = false;
            Assert.True(Logits(model, ids).allclose(baseLogits, 1e-5, 1e-6), "disabled: the base model exactly");
        }
        Assert.Same(original, model.Attention);
    }

    [Fact]
    public void Merge_and_unload_restores_the_attention_and_keeps_the_trained_norms()
    {
        using var scope = torch.NewDisposeScope();
        using var model = Model();
        var ids = Ids(5);
        var original = model.Attention;
        var adapter = new LongLoraMethod().Attach(model, new { r = 4, lora_alpha = 8, init_lora_weights = false });
        var norm = model.Root.get_submodule("model.norm")!.named_parameters().First().parameter;
        using (torch.no_grad()) norm.add_(0.25); // the trainable copy ("trained")
        adapter.SetTraining(false);
        var adapted = Logits(model, ids);

        adapter.MergeAndUnload();

        Assert.Same(original, model.Attention);
        Assert.DoesNotContain(model.Root.state_dict().Keys, k => k.Contains("lora_") || k.Contains("base_layer"));
        Assert.True(Logits(model, ids).allclose(adapted, 1e-4, 1e-5), "the plain model computes what the adapter did in inference");
        adapter.Dispose();
        Assert.Same(original, model.Attention);
    }

    [Fact]
    public void Trains_lora_embeddings_and_norms_and_leaves_the_base_weights()
    {
        using var scope = torch.NewDisposeScope();
        using var model = Model();
        var ids = Ids(3);
        var q = model.Root.get_submodule("model.layers.0.self_attn.q_proj")!.named_parameters().First().parameter.clone();
        var embed = model.Root.get_submodule("model.embed_tokens")!.named_parameters().First().parameter.clone();
        using var adapter = new LongLoraMethod().Attach(model, new { r = 4, lora_alpha = 8 });
        var names = adapter.StateDict().Keys.ToList();
        Assert.Contains(names, n => n.EndsWith("self_attn.q_proj.lora_A.weight"));
        Assert.Contains(names, n => n.Contains("embed_tokens"));
        Assert.Contains(names, n => n.Contains("input_layernorm"));
        Assert.Contains(names, n => n.EndsWith("model.norm.weight"));
        Assert.DoesNotContain(names, n => n.Contains("mlp"));

        using var optimizer = new AdamW(adapter.ParameterGroups(1e-2, 0.0));
        var losses = new List<float>();
        adapter.SetTraining(true);
        model.Root.train();
        for (var step = 0; step < 40; step++)
        {
            using var stepScope = torch.NewDisposeScope();
            var loss = model.ComputeLoss(ids, ids);
            loss.backward();
            optimizer.step();
            optimizer.zero_grad();
            losses.Add(loss.item<float>());
        }
        Assert.True(losses[^1] < losses[0] * 0.85, $"loss {losses[0]} → {losses[^1]}");
        Assert.True(model.Root.get_submodule("model.layers.0.self_attn.q_proj.base_layer")!.named_parameters().First().parameter.Equals(q), "frozen base weight changed");
        var trainedEmbed = adapter.StateDict().First(p => p.Key.Contains("embed_tokens")).Value;
        Assert.False(trainedEmbed.to(embed.dtype).Equals(embed), "the embedding copy should train");
    }

    [Fact]
    public void Saves_peft_files_and_loads_back_the_same_model()
    {
        using var scope = torch.NewDisposeScope();
        var dir = Path.Combine(Path.GetTempPath(), "lorahub-longlora-" + Guid.NewGuid().ToString("N"));
        var ids = Ids(4);
        Tensor expected;
        using (var model = Model())
        {
            using var adapter = new LongLoraMethod().Attach(model, new { r = 4, group_size_ratio = 0.5 });
            using (torch.no_grad())
                foreach (var p in adapter.ParameterGroups(0, 0).SelectMany(g => g.Parameters)) p.add_(torch.randn(p.shape) * 0.05);
            adapter.SetTraining(false);
            expected = Logits(model, ids);
            adapter.Save(dir);
        }
        try
        {
            Assert.True(File.Exists(Path.Combine(dir, "adapter_config.json")));
            Assert.True(File.Exists(Path.Combine(dir, "adapter_model.safetensors")));
            Assert.Contains("\"group_size_ratio\": 0.5", File.ReadAllText(Path.Combine(dir, "longlora_config.json")));
            using var fresh = Model();
            using var loaded = new LongLoraMethod().Load(fresh, dir);
            loaded.SetTraining(false);
            Assert.True(Logits(fresh, ids).allclose(expected, 1e-5, 1e-6));
            Assert.Equal(0.5, ((LongLoraOptions)loaded.Options).GroupSizeRatio);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void Bad_options_and_folders_are_reported()
    {
        using var model = Model();
        var e = Assert.Throws<AdapterConfigurationException>(() => new LongLoraMethod().Attach(model, new { group_size_ratio = 0.3 }));
        Assert.Contains("group_size_ratio", e.Message);
        var missing = Assert.Throws<FileNotFoundException>(() => new LongLoraMethod().Load(model, Path.GetTempPath()));
        Assert.Contains("longlora_config.json", missing.Message);
    }
}
