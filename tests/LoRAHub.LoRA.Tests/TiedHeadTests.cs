using LoRAHub.Models;
using LoRAHub.Models.Gpt2;
using LoRAHub.Models.Llama;

namespace LoRAHub.LoRA.Tests;

/// <summary>
/// modules_to_save=["lm_head"] on models with tied embeddings (tie_word_embeddings): as PEFT, the adapter trains an
/// untied copy of the head under the key base_model.model.lm_head.weight while the embedding stays frozen; merge gives a
/// folder with its own lm_head (tie_word_embeddings false); unload and delete restore the tied model.
/// </summary>
public sealed class TiedHeadTests
{
    internal static string Fixtures(string name)
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "LoRAHub.sln"))) dir = dir.Parent;
        return Path.Combine(dir!.FullName, "tests", "LoRAHub.Models.Tests", "fixtures", name);
    }

    internal static Tensor Ids(long vocab = 64, long seed = 3)
    {
        torchx.manual_seed(seed);
        return randint(vocab, [2, 7]);
    }

    internal static Tensor Logits(ICausalLanguageModel model, Tensor ids)
    {
        using var _ = no_grad();
        return model.Forward(ids).detach().clone();
    }

    private static LoraOptions HeadOptions(string[] targets) => new()
    {
        R = 4, LoraAlpha = 8, TargetModules = targets, ModulesToSave = ["lm_head"], InitLoraWeights = LoraInit.Default,
    };

    // Moves the head copy and every lora_B off their init so the adapter changes the output.
    private static void Perturb(LoraAdapter adapter)
    {
        torchx.manual_seed(5);
        using var _ = no_grad();
        foreach (var (key, t) in adapter.StateDict())
            if (key.Contains("lora_B") || key.EndsWith("lm_head.weight", StringComparison.Ordinal)) t.add_(randn_like(t).mul(0.3));
    }

    public static TheoryData<string> Models => new() { "llama_tied", "gpt2" };

    private static (ICausalLanguageModel model, string embedding, string[] targets) Load(string name)
    {
        var model = PretrainedModel.Load(Fixtures(name));
        return name == "gpt2"
            ? (model, "transformer.wte.weight", ["c_attn"])
            : (model, "model.embed_tokens.weight", ["q_proj", "v_proj"]);
    }

    [Theory, MemberData(nameof(Models))]
    public void The_copy_trains_alone_saves_under_peft_keys_and_reloads(string name)
    {
        var (model, embeddingKey, targets) = Load(name);
        var ids = Ids(name == "gpt2" ? ((Gpt2LMHeadModel)model).Config.VocabSize : 64);
        var baseline = Logits(model, ids);
        var parameterCount = model.Root.parameters().Count();
        var embedding = model.Root.named_parameters().Single(p => p.name == embeddingKey).parameter;
        var embeddingBefore = embedding.detach().clone();

        var adapter = (LoraAdapter)new LoraMethod().Attach(model, HeadOptions(targets));
        Assert.IsType<Linear>(model.Root.get_submodule("lm_head"));
        Assert.False(((ITiedOutputHead)model).OutputHeadTied);
        Assert.True(Logits(model, ids).allclose(baseline, 0, 1e-6), "a fresh copy of the head must not change the output");
        var head = adapter.StateDict()["base_model.model.lm_head.weight"];
        Assert.False(ReferenceEquals(head, embedding));
        Assert.True(head.requires_grad);
        Assert.False(embedding.requires_grad);
        Assert.Contains(adapter.ParameterGroups(1e-3, 0).SelectMany(g => g.Parameters), p => ReferenceEquals(p, head));

        // One optimizer step: the copy moves, the shared embedding table does not.
        {
            var opt = new AdamW(adapter.ParameterGroups(1e-2, 0));
            var headBefore = head.detach().clone();
            model.ComputeLoss(ids, ids).backward();
            opt.step();
            Assert.False(head.detach().equal(headBefore).all().item<bool>(), "the head copy should train");
        }
        Assert.True(embedding.detach().equal(embeddingBefore).all().item<bool>(), "the embedding must stay frozen");
        Perturb(adapter);
        var tuned = Logits(model, ids);
        Assert.False(tuned.allclose(baseline, 0, 1e-3));

        var dir = Lora.TempDir();
        adapter.Save(dir);
        var saved = torchx.load_safetensors(Path.Combine(dir, "adapter_model.safetensors"));
        Assert.Contains("base_model.model.lm_head.weight", saved.Keys);
        Assert.DoesNotContain(saved.Keys, k => k.Contains("embed_tokens") || k.Contains("wte"));
        foreach (var t in saved.Values) t.Dispose();

        var (fresh, _, _) = Load(name);
        using (var loaded = (LoraAdapter)new LoraMethod().Load(fresh, dir))
            Assert.True(Logits(fresh, ids).allclose(tuned, 0, 1e-5), "save → load must reproduce the outputs");
        Assert.Null(fresh.Root.get_submodule("lm_head"));

        // Unload: the tied model comes back (no lm_head module, same parameters, base output).
        adapter.Unload();
        Assert.Null(model.Root.get_submodule("lm_head"));
        Assert.True(((ITiedOutputHead)model).OutputHeadTied);
        Assert.Equal(parameterCount, model.Root.parameters().Count());
        Assert.True(Logits(model, ids).allclose(baseline, 0, 1e-6));
    }

    [Theory, MemberData(nameof(Models))]
    public void Merge_and_unload_writes_an_untied_folder_that_reloads_with_the_same_logits(string name)
    {
        var (model, embeddingKey, targets) = Load(name);
        var ids = Ids(name == "gpt2" ? ((Gpt2LMHeadModel)model).Config.VocabSize : 64);
        var baseline = Logits(model, ids);
        var adapter = (LoraAdapter)new LoraMethod().Attach(model, HeadOptions(targets));
        Perturb(adapter);
        var tuned = Logits(model, ids);
        var plain = (ICausalLanguageModel)adapter.MergeAndUnload();
        Assert.True(Logits(plain, ids).allclose(tuned, 0, 1e-5));
        Assert.False(((ITiedOutputHead)plain).OutputHeadTied);
        // The embedding was not trained: it equals the base's.
        var embedding = plain.Root.named_parameters().Single(p => p.name == embeddingKey).parameter;
        var head = plain.Root.named_parameters().Single(p => p.name == "lm_head.weight").parameter;
        Assert.False(embedding.equal(head).all().item<bool>());

        var dir = Lora.TempDir();
        PretrainedModel.Save(plain, dir);
        Assert.Contains("\"tie_word_embeddings\": false", File.ReadAllText(Path.Combine(dir, "config.json")));
        var reloaded = PretrainedModel.Load(dir);
        Assert.True(Logits(reloaded, ids).allclose(tuned, 0, 1e-5), "the merged folder must reload with the merged logits");
        Assert.False(Logits(reloaded, ids).allclose(baseline, 0, 1e-3));
        // Without double counting: a full fine-tuning sees each weight once.
        var all = reloaded.Root.parameters().ToList();
        Assert.Equal(all.Count, all.Distinct(ReferenceEqualityComparer.Instance).Count());
    }

    [Fact]
    public void A_copy_of_the_tied_embedding_trains_the_input_side_only_as_peft_by_default()
    {
        // PEFT (ensure_weight_tying false): modules_to_save=["embed_tokens"] copies the embedding; lm_head keeps the
        // original table.
        var (model, _, targets) = Load("llama_tied");
        var ids = Ids();
        var baseline = Logits(model, ids);
        var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions
        {
            R = 4, LoraAlpha = 8, TargetModules = targets, ModulesToSave = ["embed_tokens"],
        });
        var copy = adapter.StateDict()["base_model.model.model.embed_tokens.weight"];
        torchx.manual_seed(4);
        using (no_grad()) copy.add_(randn_like(copy).mul(0.5));
        var tuned = Logits(model, ids);

        var reference = PretrainedModel.LoadLlama(Fixtures("llama_tied"));
        reference.UntieOutputHead();
        var head = (Linear)reference.get_submodule("lm_head")!;
        head.replace_parameter("weight", new Parameter(reference.model.embed_weight.detach().clone(), requires_grad: false));
        using (no_grad()) reference.model.embed_weight.copy_(copy);
        Assert.True(tuned.allclose(Logits(reference, ids), 1e-5, 1e-5), "the head must keep the original table");
        Assert.False(tuned.allclose(baseline, 0, 1e-3));

        // Merged: the head keeps its own (original) weight, so the folder is untied and reloads the same.
        var plain = (LlamaForCausalLM)adapter.MergeAndUnload();
        Assert.False(plain.OutputHeadTied);
        var dir = Lora.TempDir();
        PretrainedModel.Save(plain, dir);
        Assert.True(Logits(PretrainedModel.Load(dir), ids).allclose(tuned, 1e-5, 1e-5));

        // Unload instead: tied again.
        var (again, _, _) = Load("llama_tied");
        var second = (LoraAdapter)new LoraMethod().Attach(again, new LoraOptions { R = 4, LoraAlpha = 8, TargetModules = targets, ModulesToSave = ["embed_tokens"] });
        second.Unload();
        Assert.True(((ITiedOutputHead)again).OutputHeadTied);
        Assert.True(Logits(again, ids).allclose(baseline, 0, 1e-6));
    }

    [Fact]
    public void Deleting_the_adapter_with_the_copy_re_ties_the_head()
    {
        var (model, _, targets) = Load("llama_tied");
        var ids = Ids();
        var baseline = Logits(model, ids);
        var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions { R = 4, LoraAlpha = 8, TargetModules = targets });
        adapter.AddAdapter("head", HeadOptions(targets));
        adapter.SetActiveAdapter("head");
        Perturb(adapter);
        Assert.False(Logits(model, ids).allclose(baseline, 0, 1e-3));
        adapter.DeleteAdapter("head");
        Assert.True(((ITiedOutputHead)model).OutputHeadTied);
        Assert.Null(model.Root.get_submodule("lm_head"));
        Assert.True(Logits(model, ids).allclose(baseline, 0, 1e-6));
        adapter.Dispose();
    }

    [Fact]
    public void Full_fine_tuning_of_a_tied_model_counts_the_shared_table_once()
    {
        var (model, _, _) = Load("llama_tied");
        var all = model.Root.parameters().ToList();
        Assert.Equal(all.Count, all.Distinct(ReferenceEqualityComparer.Instance).Count());
        Assert.DoesNotContain(model.Root.named_parameters(), p => p.name.StartsWith("lm_head", StringComparison.Ordinal));
    }
}
