using LoRAHub.Models;
using LoRAHub.Models.Llama;
using LoRAHub.Plugins.LoRA;

namespace LoRAHub.HeadLoRA.Tests;

/// <summary>
/// On the Models suite's tiny Llama (hidden 32, 4 query heads and 2 key-value heads of head_dim 8): the head geometry
/// comes from the model's config, k/v are split by their kv heads (GQA), and the PEFT LoRA export loads back with the
/// "lora" method with the same logits (the GPU machine checks Python PEFT: scripts/peft/check_headlora.sh).
/// </summary>
public sealed class LlamaTests
{
    private static LlamaForCausalLM Llama()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "LoRAHub.sln"))) dir = dir.Parent;
        return PretrainedModel.LoadLlama(Path.Combine(dir!.FullName, "tests", "LoRAHub.Models.Tests", "fixtures", "llama"));
    }

    private static Tensor Logits(LlamaForCausalLM model)
    {
        using var _ = no_grad();
        return model.Forward(tensor(new long[] { 1, 5, 9, 14, 3, 27, 8, 2 }, [1, 8]));
    }

    [Fact]
    public void Heads_come_from_the_config_and_kv_projections_split_by_kv_heads()
    {
        using var scope = NewDisposeScope();
        using var model = Llama();
        using var adapter = (HeadLoraAdapter)new HeadLoraMethod().Attach(model, new { r = 2, head_ranks = new Dictionary<string, int[]> { ["k_proj"] = [1, 3] } });
        var ranks = adapter.EffectiveHeadRanks();
        Assert.Equal([2, 2, 2, 2], ranks["model.layers.0.self_attn.q_proj"]);
        Assert.Equal([1, 3], ranks["model.layers.0.self_attn.k_proj"]);
        Assert.Equal([2, 2], ranks["model.layers.0.self_attn.v_proj"]);
        Assert.Equal([2, 2, 2, 2], ranks["model.layers.0.self_attn.o_proj"]);
        Assert.Equal(HeadSplit.Input, adapter.Layers["model.layers.1.self_attn.o_proj"].Layout.Split);
        Assert.Equal(8, adapter.Layers["model.layers.1.self_attn.v_proj"].Layout.HeadDim);
    }

    [Fact]
    public void Peft_lora_export_with_plain_mlp_layers_gives_the_same_logits_through_lora()
    {
        using var scope = NewDisposeScope();
        using var temp = new TempDir();
        using var model = Llama();
        using var adapter = (HeadLoraAdapter)new HeadLoraMethod().Attach(model, new
        {
            r = 2, lora_alpha = 6, use_rslora = true,
            target_modules = new[] { "q_proj", "k_proj", "v_proj", "o_proj", "down_proj" },
            head_ranks = new Dictionary<string, int[]> { ["q_proj"] = [3, 0, 1, 2], ["v_proj"] = [4, 1], ["down_proj"] = [5] },
        });
        Assert.Equal(HeadSplit.None, adapter.Layers["model.layers.0.mlp.down_proj"].Layout.Split);
        HeadLoraTests.Randomize(adapter, seed: 9);
        var ours = Logits(model);
        using (adapter.DisableAdapter()) Assert.False(Logits(model).allclose(ours, 1e-2, 1e-2));
        adapter.SavePeftLora(temp.Path);

        using var fresh = Llama();
        using var lora = (LoraAdapter)new LoraMethod().Load(fresh, temp.Path);
        Assert.Equal(5, lora.Layers["model.layers.1.mlp.down_proj"].Rank("default"));
        var loaded = Logits(fresh);
        Assert.True(loaded.allclose(ours, 1e-5, 1e-5), $"max diff {(loaded - ours).abs().max().item<float>()}");
    }

    [Fact]
    public void Saved_folder_records_the_head_dim_and_reloads_with_the_same_logits()
    {
        using var scope = NewDisposeScope();
        using var temp = new TempDir();
        using var model = Llama();
        using var adapter = (HeadLoraAdapter)new HeadLoraMethod().Attach(model, new { r = 2, head_ranks = new Dictionary<string, int[]> { ["v_proj"] = [0, 3] } });
        HeadLoraTests.Randomize(adapter);
        var ours = Logits(model);
        adapter.Save(temp.Path);
        Assert.Contains("\"head_dim\": 8", File.ReadAllText(Path.Combine(temp.Path, HeadLoraOptions.ConfigFileName)));
        using var fresh = Llama();
        using var loaded = (HeadLoraAdapter)new HeadLoraMethod().Load(fresh, temp.Path);
        Assert.Equal([0, 3], loaded.EffectiveHeadRanks()["model.layers.1.self_attn.v_proj"]);
        Assert.True(Logits(fresh).allclose(ours, 1e-6, 1e-6));
    }
}
