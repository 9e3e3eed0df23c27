namespace LoRAHub.LoRA.Tests;

/// <summary>LoraConfig fields with PEFT's meaning: init_lora_weights beyond true/false/gaussian, lora_bias, refusals by name.</summary>
public class ConfigParityTests
{
    private static LoraOptions With(LoraInit init, int r = 4, bool loraBias = false) => new()
    {
        R = r,
        LoraAlpha = 8,
        InitLoraWeights = init,
        LoraBias = loraBias,
        TargetModules = new[] { "q_proj", "v_proj" },
    };

    [Theory]
    [InlineData("pissa")]
    [InlineData("pissa_niter_4")]
    [InlineData("olora")]
    public void Base_rewriting_inits_keep_the_output_and_move_the_top_of_W_into_the_adapter(string init)
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var before = model.Forward(x);
        var w = Lora.Snapshot(model)["model.layers.0.self_attn.q_proj.weight"];
        using var adapter = Lora.Attach(model, With(init));
        var layer = adapter.Layers["model.layers.0.self_attn.q_proj"];
        Assert.True(model.Forward(x).allclose(before, 1e-4, 1e-5));
        // W = residual + s·B·A, and the adapter is not zero.
        var rebuilt = layer.base_linear.dense_weight().add(layer.DeltaWeight("default"));
        Assert.True(rebuilt.allclose(w, 1e-4, 1e-5));
        Assert.True(layer.B("default").abs().sum().item<float>() > 0);
        if (init == "pissa")
        {
            // The top-r singular values of W are those of s·B·A.
            var top = linalg.svdvals(w).narrow(0, 0, 4);
            Assert.True(linalg.svdvals(layer.DeltaWeight("default")).narrow(0, 0, 4).allclose(top, 1e-4, 1e-4));
        }
    }

    [Theory]
    [InlineData("pissa")]
    [InlineData("olora")]
    public void Loading_a_PiSSA_or_OLoRA_folder_on_the_original_base_rebuilds_the_residual(string init)
    {
        var dir = Lora.TempDir();
        var x = TinyModel.Batch();
        Tensor trained;
        using (var model = new TinyModel())
        {
            using var adapter = Lora.Attach(model, With(init));
            using (no_grad()) adapter.Layers["model.layers.1.self_attn.v_proj"].B("default").mul_(1.5); // "training"
            trained = model.Forward(x);
            adapter.Save(dir);
        }
        Assert.Contains($"\"init_lora_weights\": \"{init}\"", File.ReadAllText(Path.Combine(dir, "adapter_config.json")));
        using var fresh = new TinyModel();
        using var loaded = (LoraAdapter)new LoraMethod().Load(fresh, dir);
        Assert.True(fresh.Forward(x).allclose(trained, 1e-4, 1e-5));
    }

    [Fact]
    public void Orthogonal_init_starts_at_zero_update_with_nonzero_factors_and_needs_an_even_rank()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var before = model.Forward(x);
        using (var adapter = Lora.Attach(model, With(LoraInit.Orthogonal)))
        {
            var layer = adapter.Layers["model.layers.0.self_attn.q_proj"];
            Assert.True(layer.A("default").abs().sum().item<float>() > 0);
            Assert.True(layer.B("default").abs().sum().item<float>() > 0);
            Assert.True(model.Forward(x).allclose(before, 1e-5, 1e-6));
        }
        var e = Assert.Throws<AdapterConfigurationException>(() => Lora.Attach(model, With(LoraInit.Orthogonal, r: 3)));
        Assert.Contains("init_lora_weights", e.Message);
        Assert.True(model.Forward(x).allclose(before, 1e-6, 1e-6)); // left as it was
    }

    [Theory]
    [InlineData("corda")]
    [InlineData("eva")]
    [InlineData("lora_ga")]
    [InlineData("pissa_niter_x")]
    public void Inits_LoRAHub_cannot_do_are_refused_by_name(string init)
    {
        var e = Assert.Throws<ArgumentException>(() => LoraInit.Parse(init));
        Assert.Contains(init, e.Message);
        var dir = Lora.TempDir();
        File.WriteAllText(Path.Combine(dir, "adapter_config.json"),
            $$"""{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "init_lora_weights": "{{init}}"}""");
        if (init is "eva") return; // only the starting point differed: such a trained adapter loads as plain LoRA
        var read = Assert.Throws<AdapterConfigurationException>(() => LoraConfigFile.Read(Path.Combine(dir, "adapter_config.json"), []));
        Assert.Contains("init_lora_weights", read.Message);
    }

    [Fact]
    public void Lora_bias_adds_a_trained_scaled_bias_that_merges_saves_and_loads()
    {
        using var model = new TinyModel(bias: true);
        var x = TinyModel.Batch();
        using var adapter = Lora.Attach(model, With(LoraInit.Default, loraBias: true));
        var layer = adapter.Layers["model.layers.0.self_attn.q_proj"];
        Assert.NotNull(layer.BBias("default"));
        Assert.Equal(0f, layer.BBias("default")!.abs().sum().item<float>()); // zero at init, as PEFT
        Assert.Contains(adapter.ParameterGroups(1e-3, 0).SelectMany(g => g.Parameters), p => ReferenceEquals(p, layer.BBias("default")));
        using (no_grad())
        {
            foreach (var l in adapter.Layers.Values)
            {
                l.B("default").normal_();
                l.BBias("default")!.normal_();
            }
        }
        var adapted = model.Forward(x);
        var dir = Lora.TempDir();
        adapter.Save(dir);
        adapter.Merge();
        Assert.True(model.Forward(x).allclose(adapted, 1e-4, 1e-5));
        adapter.Unmerge();
        Assert.Contains("\"lora_bias\": true", File.ReadAllText(Path.Combine(dir, "adapter_config.json")));
        using var fresh = new TinyModel(bias: true);
        using var loaded = new LoraMethod().Load(fresh, dir);
        Assert.True(fresh.Forward(x).allclose(adapted, 1e-5, 1e-6));
        Assert.Contains(loaded.StateDict().Keys, k => k.EndsWith("q_proj.lora_B.bias", StringComparison.Ordinal));
    }

    [Fact]
    public void Lora_bias_on_a_layer_without_bias_trains_but_refuses_to_merge()
    {
        using var model = new TinyModel(bias: false);
        using var adapter = Lora.Attach(model, With(LoraInit.Default, loraBias: true));
        var e = Assert.Throws<InvalidOperationException>(() => adapter.Merge());
        Assert.Contains("lora_bias", e.Message);
    }

    [Theory]
    [InlineData("pissa", false)]
    [InlineData("olora", true)]
    public void A_converted_PiSSA_or_OLoRA_adapter_is_plain_LoRA_on_the_original_base(string init, bool rslora)
    {
        var x = TinyModel.Batch();
        var dir = Lora.TempDir();
        Tensor trained;
        using (var model = new TinyModel())
        {
            var options = With(init);
            options.UseRslora = rslora;
            options.RankPattern = new() { ["v_proj"] = 2 };
            using var adapter = Lora.Attach(model, options);
            using (no_grad()) foreach (var l in adapter.Layers.Values) l.B("default").mul_(1.3).add_(0.01);
            trained = model.Forward(x);
            adapter.SaveAdapter(dir, "default", convertToLora: true);
        }
        var config = File.ReadAllText(Path.Combine(dir, "adapter_config.json"));
        Assert.Contains("\"init_lora_weights\": true", config);
        Assert.Contains("\"r\": 8", config);
        using var fresh = new TinyModel();
        using var loaded = (LoraAdapter)new LoraMethod().Load(fresh, dir);
        Assert.Equal(4, loaded.Layers["model.layers.0.self_attn.v_proj"].Rank("default"));
        Assert.True(fresh.Forward(x).allclose(trained, 1e-4, 1e-5));
        // A plain adapter has nothing to convert.
        using var other = new TinyModel();
        using var plain = Lora.Attach(other, With(LoraInit.Default));
        Assert.Throws<InvalidOperationException>(() => plain.SaveAdapter(Lora.TempDir(), "default", convertToLora: true));
    }
}
