using LoRAHub.Plugins.LoRA;
using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.HeadLoRA.Tests;

/// <summary>
/// HeadLoRA on the shared tiny model (hidden 8; head_dim 2, so q/v have 4 output heads and o has 4 input heads):
/// the block structure against a hand-built LoRA, per-head ranks (parameters and gradients), merge, save/load, the PEFT
/// LoRA export, and option errors.
/// </summary>
public sealed class HeadLoraTests
{
    private const string Q = "model.layers.0.self_attn.q_proj", O = "model.layers.0.self_attn.o_proj";

    internal static HeadLoraAdapter Attach(TinyModel model, HeadLoraOptions options) => (HeadLoraAdapter)new HeadLoraMethod().Attach(model, options);

    private static HeadLoraOptions Options(int r = 2, double alpha = 4) =>
        new() { R = r, LoraAlpha = alpha, HeadDim = 2, TargetModules = TargetModuleSpec.FromNames(TinyModel.Projections) };

    /// <summary>Moves every adapter tensor away from its start (B = 0, E = 0), so each shows in the output.</summary>
    internal static void Randomize(HeadLoraAdapter adapter, long seed = 3)
    {
        torchx.manual_seed(seed);
        using var _ = no_grad();
        foreach (var p in adapter.ParameterGroups(0, 0).SelectMany(g => g.Parameters)) p.copy_(randn(p.shape) * 0.5);
    }

    [Fact]
    public void Equal_head_ranks_equal_lora_of_the_total_rank_restricted_to_the_head_blocks()
    {
        using var scope = NewDisposeScope();
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        using var head = Attach(model, Options(r: 2, alpha: 4)); // scale 4/2 = 2 per head
        Randomize(head);
        var ours = model.Forward(x);

        // LoRA of rank 4·2 = 8 with scale 16/8 = 2, whose B (q, v) or A (o) is zero outside the head blocks.
        using var reference = new TinyModel();
        using var lora = (LoraAdapter)new LoraMethod().Attach(reference, new LoraOptions
        {
            R = 8, LoraAlpha = 16, TargetModules = TargetModuleSpec.FromNames(TinyModel.Projections),
        });
        using (no_grad())
            foreach (var (path, l) in head.Layers)
            {
                Tensor a = lora.Layers[path].A("default"), b = lora.Layers[path].B("default");
                a.zero_();
                b.zero_();
                for (var h = 0; h < 4; h++)
                    if (path.EndsWith("o_proj"))
                    {
                        // A_h (2 × head_dim) reads input columns 2h..2h+1 only; B is the heads' B_h side by side.
                        a.narrow(0, 2 * h, 2).narrow(1, 2 * h, 2).copy_(l.A.narrow(0, 2 * h, 2));
                        b.copy_(l.B);
                    }
                    else
                    {
                        // B_h (head_dim × 2) writes output rows 2h..2h+1 only; A is the heads' A_h stacked.
                        a.copy_(l.A);
                        b.narrow(0, 2 * h, 2).narrow(1, 2 * h, 2).copy_(l.B.narrow(1, 2 * h, 2));
                    }
            }
        var expected = reference.Forward(x);
        Assert.True(ours.allclose(expected, 1e-5, 1e-5), $"max diff {(ours - expected).abs().max().item<float>()}");
        using (head.DisableAdapter())
            Assert.False(model.Forward(x).allclose(ours, 1e-3, 1e-3), "the adapter must change the output");
    }

    [Fact]
    public void Per_head_ranks_set_the_parameters_and_gradients_stay_in_each_heads_block()
    {
        using var scope = NewDisposeScope();
        using var model = new TinyModel();
        var options = Options(r: 1);
        options.HeadRanks = new() { ["q_proj"] = [1, 0, 3, 2], ["o_proj"] = [2, 2, 0, 1] };
        using var adapter = Attach(model, options);
        // Packed: q A (Σr × in) + B (head_dim × Σr) = 6·(8 + 2); o A (Σr × head_dim) + B (out × Σr) = 5·(2 + 8);
        // v at r = 1 on each of its 4 heads = 4·(8 + 2). Two blocks.
        var count = adapter.ParameterGroups(0, 0).SelectMany(g => g.Parameters).Sum(p => p.numel());
        Assert.Equal(2 * (60 + 50 + 40), count);
        Assert.Equal([1, 0, 3, 2], adapter.EffectiveHeadRanks()[Q]);
        Randomize(adapter);

        // q: a loss on head 2's output rows (4, 5) reaches only head 2's components (packed 1..3).
        var q = adapter.Layers[Q];
        q.call(randn(3, 8)).narrow(1, 4, 2).pow(2).sum().backward();
        AssertOnly(q.A.grad!, dim: 0, from: 1, length: 3);
        AssertOnly(q.B.grad!, dim: 1, from: 1, length: 3);

        // o: an input that is zero outside head 3's columns (6, 7) reaches only head 3's component (packed 4).
        var o = adapter.Layers[O];
        var input = zeros(3, 8);
        input.narrow(1, 6, 2).copy_(randn(3, 2));
        o.call(input).pow(2).sum().backward();
        AssertOnly(o.A.grad!, dim: 0, from: 4, length: 1);
        AssertOnly(o.B.grad!, dim: 1, from: 4, length: 1);
    }

    /// <summary>The gradient is non-zero inside [from, from + length) along dim and exactly zero elsewhere.</summary>
    private static void AssertOnly(Tensor grad, int dim, int from, int length)
    {
        Assert.True(grad.narrow(dim, from, length).abs().sum().item<float>() > 0, "the head's own block must get a gradient");
        var outside = grad.clone();
        outside.narrow(dim, from, length).zero_();
        Assert.Equal(0f, outside.abs().sum().item<float>());
    }

    [Fact]
    public void Merge_and_unmerge_are_exact_and_merge_and_unload_leaves_plain_linears()
    {
        using var scope = NewDisposeScope();
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        var options = Options();
        options.HeadRanks = new() { ["v_proj"] = [3, 1, 0, 2] };
        var adapter = Attach(model, options);
        Assert.True(model.Forward(x).allclose(baseline, 0, 0), "B = 0 at init: the base output exactly");
        Randomize(adapter);
        var adapted = model.Forward(x);
        adapter.Merge();
        Assert.True(model.Forward(x).allclose(adapted, 1e-5, 1e-5), "merged equals unmerged");
        adapter.Unmerge();
        Assert.True(model.Forward(x).allclose(adapted, 1e-5, 1e-5), "unmerged again");
        using (adapter.DisableAdapter()) Assert.True(model.Forward(x).allclose(baseline, 1e-5, 1e-6), "unmerge restores the base weights");
        adapter.MergeAndUnload();
        Assert.IsType<TorchSharp.Modules.Linear>(model.get_submodule(Q));
        Assert.DoesNotContain(model.state_dict().Keys, k => k.Contains("lora_") || k.Contains("base_layer"));
        Assert.True(model.Forward(x).allclose(adapted, 1e-5, 1e-5));
        adapter.Dispose();
    }

    [Fact]
    public void Save_and_load_reproduce_the_outputs_with_the_per_head_ranks()
    {
        using var scope = NewDisposeScope();
        using var temp = new TempDir();
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var options = Options();
        // A layer whose every head has rank 0 (as the adaptive budget can leave one) is the base layer, saved with empty tensors.
        options.HeadRanks = new() { ["layers\\.1\\.self_attn\\.q_proj"] = [0, 4, 1, 1], ["layers\\.0\\.self_attn\\.v_proj"] = [0, 0, 0, 0] };
        options.UseRslora = true;
        using var adapter = Attach(model, options);
        Randomize(adapter);
        var trained = model.Forward(x);
        adapter.Save(temp.Path);
        Assert.True(File.Exists(Path.Combine(temp.Path, HeadLoraOptions.ConfigFileName)));
        Assert.True(new HeadLoraMethod().Claims(temp.Path));
        Assert.False(new LoraMethod().Claims(temp.Path), "our own format is not a PEFT LoRA folder");

        using var fresh = new TinyModel();
        using var loaded = (HeadLoraAdapter)new HeadLoraMethod().Load(fresh, temp.Path);
        Assert.Equal([0, 4, 1, 1], loaded.EffectiveHeadRanks()["model.layers.1.self_attn.q_proj"]);
        Assert.Equal([2, 2, 2, 2], loaded.EffectiveHeadRanks()[Q]);
        Assert.Equal([0, 0, 0, 0], loaded.EffectiveHeadRanks()["model.layers.0.self_attn.v_proj"]);
        Assert.True(fresh.Forward(x).allclose(trained, 1e-6, 1e-6));

        // The PEFT export leaves the rank-0 layer out.
        using var exported = new TempDir();
        loaded.SavePeftLora(exported.Path);
        Assert.DoesNotContain("model.layers.0.self_attn.v_proj", File.ReadAllText(Path.Combine(exported.Path, "adapter_config.json")));
    }

    [Fact]
    public void Peft_lora_export_loads_with_the_lora_method_and_the_same_logits()
    {
        using var scope = NewDisposeScope();
        using var temp = new TempDir();
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var options = Options(r: 2, alpha: 3);
        options.HeadRanks = new() { ["q_proj"] = [1, 0, 3, 2], ["o_proj"] = [2, 2, 0, 1] };
        using var adapter = Attach(model, options);
        Randomize(adapter);
        var ours = model.Forward(x);
        adapter.SavePeftLora(temp.Path);

        Assert.True(new LoraMethod().Claims(temp.Path), "the export is a plain PEFT LoRA folder");
        Assert.False(new HeadLoraMethod().Claims(temp.Path));
        var config = File.ReadAllText(Path.Combine(temp.Path, "adapter_config.json"));
        Assert.Contains("\"peft_type\": \"LORA\"", config);
        var saved = torchx.load_safetensors(Path.Combine(temp.Path, "adapter_model.safetensors"));
        Assert.Equal([6L, 8L], saved[$"base_model.model.{Q}.lora_A.weight"].shape);  // rank Σ r_h = 6
        Assert.Equal([8L, 5L], saved[$"base_model.model.{O}.lora_B.weight"].shape);  // rank 5

        using var fresh = new TinyModel();
        using var lora = (LoraAdapter)new LoraMethod().Load(fresh, temp.Path);
        Assert.Equal(6, lora.Layers[Q].Rank("default"));
        Assert.Equal(1.0, lora.Layers[Q].Scaling("default"));
        var loaded = fresh.Forward(x);
        Assert.True(loaded.allclose(ours, 1e-5, 1e-5), $"max diff {(loaded - ours).abs().max().item<float>()}");

        // The method option does the same through Save.
        using var temp2 = new TempDir();
        options.SaveFormat = "lora";
        adapter.Save(temp2.Path);
        Assert.True(new LoraMethod().Claims(temp2.Path));
    }

    [Fact]
    public void Bf16_activations_run_the_adapter_in_bf16_with_fp32_master_weights()
    {
        using var scope = NewDisposeScope();
        using var model = new TinyModel(dtype: ScalarType.BFloat16);
        var options = Options();
        options.HeadRanks = new() { ["q_proj"] = [1, 0, 3, 2], ["o_proj"] = [2, 2, 0, 1] };
        using var adapter = Attach(model, options);
        Randomize(adapter);
        var logits = model.Forward(TinyModel.Batch());
        Assert.Equal(ScalarType.BFloat16, logits.dtype);
        logits.to(ScalarType.Float32).pow(2).mean().backward();
        var q = adapter.Layers[Q];
        Assert.Equal(ScalarType.Float32, q.A.dtype);
        Assert.Equal(ScalarType.Float32, q.B.grad!.dtype);
        Assert.True(q.B.grad!.abs().sum().item<float>() > 0);
    }

    [Fact]
    public void Bad_options_name_the_option_and_the_fix()
    {
        using var model = new TinyModel();
        var e = Assert.Throws<AdapterConfigurationException>(() => new HeadLoraMethod().Attach(model, new { target_modules = TinyModel.Projections }));
        Assert.Contains("head_dim", e.Message); // the tiny model has no config to read it from
        e = Assert.Throws<AdapterConfigurationException>(() => new HeadLoraMethod().Attach(model, new { head_dim = 3, target_modules = TinyModel.Projections }));
        Assert.Contains("does not divide", e.Message);
        e = Assert.Throws<AdapterConfigurationException>(() => new HeadLoraMethod().Attach(model, new
        {
            head_dim = 2, target_modules = TinyModel.Projections, head_ranks = new Dictionary<string, int[]> { ["q_proj"] = [1, 2] },
        }));
        Assert.Contains("4 heads", e.Message);
        e = Assert.Throws<AdapterConfigurationException>(() => new HeadLoraMethod().Attach(model, new { head_dim = 2, adaptive = true, target_modules = TinyModel.Projections }));
        Assert.Contains("total_step", e.Message);
        e = Assert.Throws<AdapterConfigurationException>(() => new HeadLoraMethod().Attach(model, new { head_dim = 2, save_format = "peft", target_modules = TinyModel.Projections }));
        Assert.Contains("save_format", e.Message);
        Assert.IsType<TorchSharp.Modules.Linear>(model.get_submodule(Q)); // failed attaches leave the model as it was
    }
}

/// <summary>A temporary folder, deleted on dispose.</summary>
internal sealed class TempDir : IDisposable
{
    public string Path { get; } = Directory.CreateTempSubdirectory("lorahub-headlora-").FullName;

    public void Dispose() => Directory.Delete(Path, recursive: true);
}
