using LoRAHub.Plugins.DoRA;
using LoRAHub.Plugins.LoRA;

namespace LoRAHub.Tuners.Tests;

/// <summary>IAdapterSet on the kit's LoraAdapter: mixed batches, deletion, several active adapters, safe merge.</summary>
public class AdapterSetTests
{
    private static LoraAdapter TwoAdapters(TinyModel model, string method)
    {
        IAdapterMethod m = method == "dora" ? new DoraMethod() : new LoraMethod();
        LoraOptions Options(string[] targets) => method == "dora"
            ? new DoraOptions { InitLoraWeights = LoraInit.Random, TargetModules = targets }
            : new LoraOptions { InitLoraWeights = LoraInit.Random, TargetModules = targets };
        var adapter = (LoraAdapter)m.Attach(model, Options(["q_proj", "v_proj"]));
        adapter.AddAdapter("other", Options(["v_proj", "o_proj"]));
        return adapter;
    }

    [Theory]
    [InlineData("lora")]
    [InlineData("dora")]
    public void A_mixed_batch_equals_each_adapter_run_alone(string method)
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch(batch: 4);
        var baseline = model.Forward(x);
        using var adapter = TwoAdapters(model, method);
        var first = model.Forward(x);
        adapter.SetActiveAdapter("other");
        var other = model.Forward(x);
        Assert.False(first.allclose(other, 1e-3, 1e-3));

        IAdapterSet set = adapter;
        Assert.Equal(["default", "other"], set.AdapterNames);
        Tensor mixed;
        using (set.UseAdapterPerRow(["other", IAdapterSet.BaseName, "default", "other"]))
            mixed = model.Forward(x);
        Assert.True(mixed[0].allclose(other[0], 1e-5, 1e-6));
        Assert.True(mixed[1].allclose(baseline[1], 1e-5, 1e-6));
        Assert.True(mixed[2].allclose(first[2], 1e-5, 1e-6));
        Assert.True(mixed[3].allclose(other[3], 1e-5, 1e-6));
        // After the scope the active adapter is back for every row.
        Assert.True(model.Forward(x).allclose(other, 1e-6, 1e-6));
    }

    [Fact]
    public void A_mixed_batch_refuses_unknown_names_wrong_batch_sizes_and_merged_adapters()
    {
        using var model = new TinyModel();
        using var adapter = TwoAdapters(model, "lora");
        Assert.Throws<KeyNotFoundException>(() => adapter.UseAdapterPerRow(["nope"]));
        using (adapter.UseAdapterPerRow(["default", "other", "other"]))
            Assert.Throws<InvalidOperationException>(() => model.Forward(TinyModel.Batch(batch: 2)));
        adapter.Merge();
        Assert.Throws<InvalidOperationException>(() => adapter.UseAdapterPerRow(["default"]));
    }

    [Theory]
    [InlineData("lora")]
    [InlineData("dora")]
    public void Deleting_adapters_frees_them_and_the_last_one_gives_the_base(string method)
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        using var adapter = TwoAdapters(model, method);
        adapter.SetActiveAdapter("other");
        var other = model.Forward(x);
        adapter.DeleteAdapter("default");
        Assert.Equal(["other"], adapter.AdapterNames);
        Assert.DoesNotContain(model.named_parameters(), p => p.name.Contains(".default"));
        Assert.True(model.Forward(x).allclose(other, 1e-6, 1e-6));
        adapter.Merge();
        adapter.DeleteAdapter("other"); // merged: unmerged first
        Assert.Empty(adapter.AdapterNames);
        Assert.True(model.Forward(x).allclose(baseline, 1e-5, 1e-6));
        Assert.Throws<KeyNotFoundException>(() => adapter.DeleteAdapter("other"));
    }

    [Fact]
    public void Several_active_adapters_add_their_updates_and_all_train()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        using var adapter = TwoAdapters(model, "lora");
        var first = model.Forward(x);
        adapter.SetActiveAdapter("other");
        var other = model.Forward(x);
        adapter.SetActiveAdapters(["default", "other"]);
        var both = model.Forward(x);
        // The adapters touch different layers of a nonlinear model, so compare against the merged form instead.
        Assert.False(both.allclose(first, 1e-3, 1e-3));
        Assert.False(both.allclose(other, 1e-3, 1e-3));
        adapter.Merge();
        Assert.True(model.Forward(x).allclose(both, 1e-4, 1e-5));
        adapter.Unmerge();
        Assert.True(model.Forward(x).allclose(both, 1e-5, 1e-6));
        var trainable = adapter.ParameterGroups(1e-3, 0).SelectMany(g => g.Parameters).Count();
        Assert.Equal(2 * (2 * 2 * 2), trainable); // per adapter: A and B on two targets in each of two blocks
        Assert.True(model.Forward(x).allclose(both, 1e-5, 1e-6));
        Assert.False(baseline.allclose(both, 1e-3, 1e-3));
    }

    [Fact]
    public void Merging_chosen_adapters_keeps_the_others_in_forward()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        using var adapter = TwoAdapters(model, "lora");
        adapter.SetActiveAdapters(["default", "other"]);
        var both = model.Forward(x);
        adapter.Merge(["other"]);
        Assert.Equal(["other"], adapter.Layers["model.layers.0.self_attn.v_proj"].MergedAdapters);
        Assert.True(model.Forward(x).allclose(both, 1e-4, 1e-5));
        adapter.Unmerge();
        Assert.True(model.Forward(x).allclose(both, 1e-5, 1e-6));
    }

    [Fact]
    public void Safe_merge_refuses_a_broken_adapter_and_leaves_the_weight_as_it_was()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        using var adapter = TwoAdapters(model, "lora");
        var layer = adapter.Layers["model.layers.0.self_attn.q_proj"];
        var weight = layer.base_linear.dense_weight().clone();
        using (no_grad()) layer.B("default")[0, 0] = float.NaN;
        var e = Assert.Throws<InvalidOperationException>(() => adapter.Merge(["default"], safeMerge: true));
        Assert.Contains("NaN", e.Message);
        Assert.True(layer.base_linear.dense_weight().Equals(weight));
        Assert.False(layer.Merged);
    }

    [Fact]
    public void Merge_and_unload_of_chosen_adapters_gives_the_plain_model_with_only_them()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        using var adapter = TwoAdapters(model, "lora");
        adapter.SetActiveAdapter("other");
        var other = model.Forward(x);
        adapter.SetActiveAdapter("default");
        adapter.MergeAndUnload(["other"], safeMerge: true);
        Assert.True(adapter.IsUnloaded);
        Assert.DoesNotContain(model.named_modules(), m => m.module is TunerLayer);
        Assert.True(model.Forward(x).allclose(other, 1e-4, 1e-5));
    }
}
