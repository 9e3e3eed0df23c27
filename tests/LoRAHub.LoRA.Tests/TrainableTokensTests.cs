using System.Text.Json;
using LoRAHub.Models;
using LoRAHub.Models.Llama;

namespace LoRAHub.LoRA.Tests;

/// <summary>
/// PEFT's trainable_token_indices: only the listed rows of the input embedding train (and, on a tied model, the same
/// rows of the output head); saved under PEFT's key as the rows' values; merge writes them into the table.
/// </summary>
public sealed class TrainableTokensTests
{
    private const string Key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
    private static readonly long[] Rows = [3, 5, 17];

    private static LlamaForCausalLM Tied() => PretrainedModel.LoadLlama(TiedHeadTests.Fixtures("llama_tied"));

    private static LoraOptions Options(TrainableTokenIndices? tokens) => new()
    {
        R = 4, LoraAlpha = 8, TargetModules = new[] { "q_proj", "v_proj" }, TrainableTokenIndices = tokens,
    };

    // The same model with rows of its (tied) table replaced: what the adapter must compute.
    private static Tensor Reference(Tensor ids, Tensor values, bool tied = true)
    {
        using var model = Tied();
        using (no_grad())
            model.model.embed_weight.index_copy_(0, tensor(Rows), values.to(ScalarType.Float32));
        if (!tied) throw new NotSupportedException();
        return TiedHeadTests.Logits(model, ids);
    }

    private static Tensor IdsWithTrainedTokens()
    {
        var ids = TiedHeadTests.Ids();
        ids[0, 1] = 3;
        ids[1, 4] = 17;
        return ids;
    }

    [Fact]
    public void Only_the_listed_rows_train_in_the_embedding_and_the_tied_head()
    {
        using var model = Tied();
        var ids = IdsWithTrainedTokens();
        var baseline = TiedHeadTests.Logits(model, ids);
        var table = model.model.embed_weight.detach().clone();
        var adapter = (LoraAdapter)new LoraMethod().Attach(model, Options(Rows));

        var values = (Parameter)adapter.StateDict()[Key];
        Assert.Equal([Rows.Length, 32], values.shape);
        Assert.True(values.equal(table.index_select(0, tensor(Rows))).all().item<bool>(), "rows start at the base's values");
        Assert.True(TiedHeadTests.Logits(model, ids).allclose(baseline, 0, 1e-6));
        Assert.Contains(adapter.ParameterGroups(1e-3, 0).SelectMany(g => g.Parameters), p => ReferenceEquals(p, values));
        Assert.False(model.model.embed_weight.requires_grad);

        // A training step moves the listed rows only; the table itself stays as it was.
        var opt = new AdamW(adapter.ParameterGroups(1e-2, 0));
        model.ComputeLoss(ids, ids).backward();
        Assert.NotNull(values.grad);
        opt.step();
        Assert.False(values.detach().equal(table.index_select(0, tensor(Rows))).all().item<bool>());
        Assert.True(model.model.embed_weight.detach().equal(table).all().item<bool>());

        // Forward equals the base with those rows replaced, in the input embedding and in the tied head's logits (LoRA's B
        // back at zero, so only the rows differ from the base).
        using (no_grad())
        {
            values.add_(randn_like(values));
            foreach (var (key, t) in adapter.StateDict().Where(kv => kv.Key.Contains("lora_B"))) t.zero_();
        }
        var tuned = TiedHeadTests.Logits(model, ids);
        Assert.True(tuned.allclose(Reference(ids, values.detach()), 1e-5, 1e-5), "logits must equal the base with the rows replaced");
        Assert.False(tuned.allclose(baseline, 0, 1e-3));

        // Disabled: the base output.
        using (adapter.DisableAdapter())
            Assert.True(TiedHeadTests.Logits(model, ids).allclose(baseline, 0, 1e-6));

        // Unload: the plain tied model, untouched.
        adapter.Unload();
        Assert.True(model.OutputHeadTied);
        Assert.Null(model.get_submodule("lm_head"));
        Assert.IsType<Embedding>(model.get_submodule("model.embed_tokens"));
        Assert.True(TiedHeadTests.Logits(model, ids).allclose(baseline, 0, 1e-6));
    }

    [Fact]
    public void On_gpt2_the_rows_of_wte_and_of_the_tied_head_follow_the_trained_values()
    {
        var path = TiedHeadTests.Fixtures("gpt2");
        using var model = (LoRAHub.Models.Gpt2.Gpt2LMHeadModel)PretrainedModel.Load(path);
        var ids = IdsWithTrainedTokens();
        var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions
        {
            R = 4, LoraAlpha = 8, TargetModules = new[] { "c_attn" }, TrainableTokenIndices = Rows,
        });
        var values = adapter.StateDict()["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"];
        torchx.manual_seed(2);
        using (no_grad()) values.add_(randn_like(values));
        var tuned = TiedHeadTests.Logits(model, ids);
        using var reference = (LoRAHub.Models.Gpt2.Gpt2LMHeadModel)PretrainedModel.Load(path);
        using (no_grad()) reference.transformer.wte_weight.index_copy_(0, tensor(Rows), values.detach());
        Assert.True(tuned.allclose(TiedHeadTests.Logits(reference, ids), 1e-5, 1e-5), "logits must equal GPT-2 with the rows of wte replaced");
        adapter.Dispose();
        Assert.Null(model.get_submodule("lm_head"));
    }

    [Fact]
    public void Save_load_and_merge_round_trip()
    {
        using var model = Tied();
        var ids = IdsWithTrainedTokens();
        var baseline = TiedHeadTests.Logits(model, ids);
        var adapter = (LoraAdapter)new LoraMethod().Attach(model, Options(Rows));
        torchx.manual_seed(9);
        using (no_grad())
            foreach (var (key, t) in adapter.StateDict())
                t.add_(randn_like(t).mul(key == Key ? 1.0 : 0.3));
        var tuned = TiedHeadTests.Logits(model, ids);

        var dir = Lora.TempDir();
        adapter.Save(dir);
        var saved = torchx.load_safetensors(Path.Combine(dir, "adapter_model.safetensors"));
        Assert.Contains(Key, saved.Keys);
        Assert.DoesNotContain(saved.Keys, k => k.Contains("lm_head")); // the tied head's rows are the embedding's
        var config = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json"))).RootElement;
        Assert.Equal(Rows, config.GetProperty("trainable_token_indices").EnumerateArray().Select(e => e.GetInt64()));

        using (var fresh = Tied())
        {
            using var loaded = (LoraAdapter)new LoraMethod().Load(fresh, dir);
            Assert.True(TiedHeadTests.Logits(fresh, ids).allclose(tuned, 0, 1e-5), "save → load must reproduce the outputs");
        }

        // In-place merge and unmerge.
        adapter.Merge();
        Assert.True(TiedHeadTests.Logits(model, ids).allclose(tuned, 1e-5, 1e-5));
        adapter.Unmerge();
        Assert.True(TiedHeadTests.Logits(model, ids).allclose(tuned, 1e-5, 1e-5));

        // merge_and_unload: rows written into the shared table, model tied again; the folder reloads the same.
        var plain = (LlamaForCausalLM)adapter.MergeAndUnload();
        Assert.True(plain.OutputHeadTied);
        Assert.True(plain.model.embed_weight.index_select(0, tensor(Rows)).allclose(saved[Key], 0, 0));
        Assert.True(TiedHeadTests.Logits(plain, ids).allclose(tuned, 1e-5, 1e-5));
        var merged = Lora.TempDir();
        PretrainedModel.Save(plain, merged);
        using var reloaded = PretrainedModel.LoadLlama(merged);
        Assert.True(TiedHeadTests.Logits(reloaded, ids).allclose(tuned, 1e-5, 1e-5));
        Assert.False(tuned.allclose(baseline, 0, 1e-3));
        foreach (var t in saved.Values) t.Dispose();
    }

    [Fact]
    public void The_dict_form_targets_named_modules_and_round_trips_in_the_config()
    {
        // An untied model (the Models suite's llama): rows of embed_tokens and, separately, of lm_head.
        using var model = PretrainedModel.LoadLlama(TiedHeadTests.Fixtures("llama"));
        var ids = IdsWithTrainedTokens();
        var baseline = TiedHeadTests.Logits(model, ids);
        var tokens = new TrainableTokenIndices(new Dictionary<string, IReadOnlyList<long>> { ["embed_tokens"] = [3, 5], ["lm_head"] = [17] });
        var adapter = (LoraAdapter)new LoraMethod().Attach(model, Options(tokens));
        var state = adapter.StateDict();
        Assert.Equal([2, 32], state[Key].shape);
        Assert.Equal([1, 32], state["base_model.model.lm_head.token_adapter.trainable_tokens_delta"].shape);
        using (no_grad()) state["base_model.model.lm_head.token_adapter.trainable_tokens_delta"].add_(1.0);
        var tuned = TiedHeadTests.Logits(model, ids);
        // Only the logit of token 17 moved.
        var moved = tuned.sub(baseline).abs().amax([0, 1]).gt(1e-6).nonzero().reshape(-1);
        Assert.Equal([17L], moved.data<long>().ToArray());

        var dir = Lora.TempDir();
        adapter.Save(dir);
        var config = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json"))).RootElement.GetProperty("trainable_token_indices");
        Assert.Equal(JsonValueKind.Object, config.ValueKind);
        Assert.Equal([3L, 5L], config.GetProperty("embed_tokens").EnumerateArray().Select(e => e.GetInt64()));
        var read = LoraConfigFile.Read(Path.Combine(dir, "adapter_config.json"), []);
        Assert.Equal([17L], read.TrainableTokenIndices!.PerModule!["lm_head"]);
        adapter.Dispose();
        Assert.True(TiedHeadTests.Logits(model, ids).allclose(baseline, 0, 1e-6));
    }

    [Fact]
    public void A_second_adapter_with_rows_also_reaches_the_tied_head_and_a_head_copy_excludes_rows()
    {
        using var model = Tied();
        var ids = IdsWithTrainedTokens();
        var adapter = (LoraAdapter)new LoraMethod().Attach(model, Options(Rows));
        adapter.AddAdapter("other", Options(new long[] { 3, 17 }));
        adapter.SetActiveAdapter("other");
        var values = adapter.StateDictOf("other")[Key];
        using (no_grad())
        {
            values.add_(1.0);
            foreach (var (key, t) in adapter.StateDictOf("other").Where(kv => kv.Key.Contains("lora_B"))) t.zero_();
        }
        using var reference = Tied();
        using (no_grad()) reference.model.embed_weight.index_copy_(0, tensor(new long[] { 3, 17 }), values.detach());
        Assert.True(TiedHeadTests.Logits(model, ids).allclose(TiedHeadTests.Logits(reference, ids), 1e-5, 1e-5));
        adapter.Dispose();
        Assert.True(model.OutputHeadTied);

        // modules_to_save=["lm_head"] untied the head: rows on the embedding could not reach it, so they are refused.
        var withCopy = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions { R = 4, LoraAlpha = 8, TargetModules = new[] { "q_proj" }, ModulesToSave = ["lm_head"] });
        var e = Assert.Throws<AdapterConfigurationException>(() => withCopy.AddAdapter("rows", Options(Rows)));
        Assert.Contains("output head", e.Message);
        withCopy.Dispose();
        Assert.True(model.OutputHeadTied);
    }

    [Theory]
    [InlineData("""{"embed_tokens": [1, 99]}""", "out of range")]
    [InlineData("""[1, 1]""", "repeats")]
    [InlineData("""{"no_such": [1]}""", "matches no module")]
    [InlineData("""[]""", "lists no token")]
    public void Bad_indices_are_refused_by_name(string json, string expected)
    {
        using var model = Tied();
        var tokens = JsonSerializer.Deserialize<TrainableTokenIndices>(json);
        var e = Assert.Throws<AdapterConfigurationException>(() => new LoraMethod().Attach(model, Options(tokens)));
        Assert.Contains(expected, e.Message);
        Assert.Contains("trainable_token_indices", e.Message);
        Assert.IsType<Embedding>(model.get_submodule("model.embed_tokens"));
        Assert.True(model.OutputHeadTied);
    }
}
