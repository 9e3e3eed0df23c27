using LoRAHub.Models;
using LoRAHub.Plugins.DoRA;
using LoRAHub.Plugins.LoRA;
using LoRAHub.TorchExtensions.Modules;

namespace LoRAHub.Tuners.Tests;

/// <summary>The contract's unload verbs: merge_and_unload (a plain model, saved as an ordinary Hugging Face folder) and unload.</summary>
public class MergeAndUnloadTests
{
    private static readonly long[] Ids = [1, 5, 9, 2, 7, 3];

    private static Tensor Logits(ICausalLanguageModel model)
    {
        using var _ = no_grad();
        return model.Forward(tensor(Ids, [1, Ids.Length])).detach().clone();
    }

    private static IAdapterMethod Method(string name) => name == "dora" ? new DoraMethod() : new LoraMethod();

    // Random B as well as A, so the adapter changes the logits; every projection of the tiny Llama.
    private static object Options => new
    {
        r = 4, lora_alpha = 8, init_lora_weights = false,
        target_modules = new[] { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" },
    };

    [Theory]
    [InlineData("lora")]
    [InlineData("dora")]
    public void Merge_and_unload_then_save_gives_an_ordinary_hf_folder_with_the_merged_logits(string method)
    {
        using var model = PretrainedModel.Load(Folders.LlamaFixture);
        var baseKeys = model.Root.state_dict().Keys.Order(StringComparer.Ordinal).ToList();
        var baseline = Logits(model);
        var adapter = Method(method).Attach(model, Options);
        var adapted = Logits(model);
        Assert.False(adapted.allclose(baseline, 1e-3, 1e-3), "the adapter should change the logits");

        var merged = adapter.MergeAndUnload<ICausalLanguageModel>();

        Assert.Same(model, merged);
        Assert.DoesNotContain(model.Root.named_modules(), m => m.module is TunerLayer);
        Assert.Equal(baseKeys, model.Root.state_dict().Keys.Order(StringComparer.Ordinal));
        Assert.True(Logits(merged).allclose(adapted, 1e-4, 1e-5), $"max diff {(Logits(merged) - adapted).abs().max().ToDouble()}");
        adapter.Dispose(); // spent: nothing left to undo

        var dir = Folders.Temp();
        PretrainedModel.Save(merged, dir);
        using var reloaded = PretrainedModel.Load(dir);
        Assert.True(Logits(reloaded).allclose(adapted, 1e-4, 1e-5), $"max diff {(Logits(reloaded) - adapted).abs().max().ToDouble()}");
        Directory.Delete(dir, recursive: true);
    }

    [Fact]
    public void Merge_and_unload_keeps_the_trained_modules_to_save_copy()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var head = (Linear)model.get_submodule("lm_head")!;
        var original = head.weight!;
        using var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions
        {
            InitLoraWeights = LoraInit.Random, TargetModules = new[] { "q_proj" }, ModulesToSave = ["lm_head"],
        });
        using (no_grad()) head.weight!.add_(0.5); // "trained": only the copy changes
        var adapted = model.Forward(x);

        adapter.MergeAndUnload();

        Assert.IsType<Linear>(model.get_submodule("model.layers.0.self_attn.q_proj"));
        Assert.NotSame(original, head.weight);
        Assert.False(head.weight!.requires_grad);
        Assert.True(model.Forward(x).allclose(adapted, 1e-5, 1e-6));
        Assert.Throws<InvalidOperationException>(() => adapter.Save(Folders.Temp()));
    }

    [Fact]
    public void Unload_gives_back_the_base_model_exactly()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        var head = (Linear)model.get_submodule("lm_head")!;
        var original = head.weight!;
        var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions
        {
            InitLoraWeights = LoraInit.Random, TargetModules = new[] { "q_proj", "v_proj" }, ModulesToSave = ["lm_head"],
        });
        adapter.Merge();
        Assert.False(model.Forward(x).allclose(baseline, 1e-3, 1e-3));

        Assert.Same(model, adapter.Unload());

        Assert.DoesNotContain(model.named_modules(), m => m.module is TunerLayer);
        Assert.DoesNotContain(model.state_dict().Keys, k => k.Contains("lora_") || k.Contains("base_layer"));
        Assert.Same(original, head.weight);
        Assert.True(model.Forward(x).allclose(baseline, 1e-6, 1e-6));
        Assert.True(adapter.IsUnloaded);
        Assert.Throws<InvalidOperationException>(() => adapter.Merge());
        Assert.Throws<InvalidOperationException>(() => adapter.AddAdapter("again", new LoraOptions { TargetModules = new[] { "q_proj" } }));
        adapter.Dispose();
        // The model takes a new adapter as any plain model does.
        using var again = new LoraMethod().Attach(model, new LoraOptions { TargetModules = new[] { "q_proj" } });
    }

    [Fact]
    public void On_a_4bit_base_merge_is_refused_and_merge_and_unload_gives_dense_weights()
    {
        using var model = new TinyModel(hidden: 64);
        var x = TinyModel.Batch();
        const string path = "model.layers.0.self_attn.q_proj";
        var dense = LinearLayer.From(model.get_submodule(path))!;
        model.replace_submodule(path, Linear4bit.FromLinear(dense, compute_dtype: ScalarType.Float32)).Dispose();
        using var adapter = (LoraAdapter)new LoraMethod().Attach(model, new LoraOptions { InitLoraWeights = LoraInit.Random, TargetModules = new[] { "q_proj" } });
        var adapted = model.Forward(x);

        var e = Assert.Throws<InvalidOperationException>(() => adapter.Merge());
        Assert.Contains(path, e.Message);
        Assert.Contains("MergeAndUnload", e.Message);
        Assert.False(adapter.IsMerged);
        Assert.Throws<InvalidOperationException>(() => adapter.Layers[path].Merge("default")); // the layer refuses too

        adapter.MergeAndUnload();

        var merged = Assert.IsType<Linear>(model.get_submodule(path));
        Assert.Equal(ScalarType.Float32, merged.weight!.dtype); // the model's dtype
        Assert.True(model.Forward(x).allclose(adapted, 1e-4, 1e-5), $"max diff {(model.Forward(x) - adapted).abs().max().ToDouble()}");
    }
}
