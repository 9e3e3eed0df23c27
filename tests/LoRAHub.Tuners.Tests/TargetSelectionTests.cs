using LoRAHub.Plugins.LoRA;

namespace LoRAHub.Tuners.Tests;

/// <summary>Target selection in one place: PEFT's check_target_module_exists with layers_to_transform and layers_pattern.</summary>
public class TargetSelectionTests
{
    private static TargetSelection Select(TargetModuleSpec targets, List<int>? layers = null, List<string>? pattern = null) =>
        new() { TargetModules = targets, LayersToTransform = layers, LayersPattern = pattern };

    [Fact]
    public void Layer_indices_pick_layers_by_the_first_numbered_segment_or_the_named_list()
    {
        var q = TargetModuleSpec.FromNames(["q_proj"]);
        Assert.True(Select(q, [1]).Matches("model.layers.1.self_attn.q_proj"));
        Assert.False(Select(q, [1]).Matches("model.layers.0.self_attn.q_proj"));
        Assert.Equal(3, Select(q).LayerIndex("model.layers.3.mlp.experts.7.up_proj")); // the layer, not the expert
        Assert.Equal(7, Select(q, pattern: ["experts"]).LayerIndex("model.layers.3.mlp.experts.7.up_proj"));
        Assert.True(Select(q, [2], ["h"]).Matches("transformer.h.2.attn.q_proj"));
        Assert.False(Select(q, [2], ["layers"]).Matches("transformer.h.2.attn.q_proj"));
        // PEFT applies layer indices to the list form only; a regex says the layers itself.
        Assert.True(Select(TargetModuleSpec.FromPattern(@".*\.q_proj"), [1]).Matches("model.layers.0.self_attn.q_proj"));
    }

    [Fact]
    public void Exclusions_win_over_targets()
    {
        var selection = new TargetSelection
        {
            TargetModules = TargetModuleSpec.FromPattern(".*_proj"),
            ExcludeModules = TargetModuleSpec.FromNames(["v_proj"]),
            ModulesToSave = ["o_proj"],
        };
        Assert.True(selection.Matches("model.layers.0.self_attn.q_proj"));
        Assert.False(selection.Matches("model.layers.0.self_attn.v_proj"));
        Assert.False(selection.Matches("model.layers.0.self_attn.o_proj"));
    }

    [Fact]
    public void Lora_adapts_only_the_listed_layers_and_records_them()
    {
        using var model = new TinyModel();
        var options = new LoraOptions { TargetModules = new[] { "q_proj", "v_proj" }, LayersToTransform = [1], LayersPattern = ["layers"] };
        using var adapter = (LoraAdapter)new LoraMethod().Attach(model, options);
        Assert.Equal(["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"], adapter.Layers.Keys.Order());

        var dir = Folders.Temp();
        adapter.Save(dir);
        using var fresh = new TinyModel();
        using var loaded = (LoraAdapter)new LoraMethod().Load(fresh, dir);
        Assert.Equal(adapter.Layers.Keys.Order(), loaded.Layers.Keys.Order());
        Directory.Delete(dir, recursive: true);
    }

    [Fact]
    public void Layer_options_peft_refuses_are_refused_naming_the_option()
    {
        using var model = new TinyModel();
        void Expect(string option, LoraOptions o) =>
            Assert.Contains($"'{option}'", Assert.Throws<AdapterConfigurationException>(() => new LoraMethod().Attach(model, o)).Message);
        Expect("layers_to_transform", new LoraOptions { TargetModules = "q_proj", LayersToTransform = [0] });
        Expect("layers_pattern", new LoraOptions { TargetModules = new[] { "q_proj" }, LayersPattern = ["layers"] });
        Expect("layers_to_transform", new LoraOptions { TargetModules = new[] { "q_proj" }, LayersToTransform = [-1] });
        Expect("target_modules", new LoraOptions { TargetModules = new[] { "q_proj" }, LayersToTransform = [5] }); // no such layer
    }
}
