
namespace LoRAHub.LoRA.Tests;

public class LoraLayerTests
{
    [Fact]
    public void Output_is_unchanged_at_init_for_kaiming_and_gaussian()
    {
        foreach (var init in new[] { LoraInit.Default, LoraInit.Gaussian })
        {
            using var model = new TinyModel();
            var x = TinyModel.Batch();
            var before = model.Forward(x);
            using var adapter = Lora.Attach(model, Lora.Options(init: init));
            var layer = adapter.Layers["model.layers.0.self_attn.q_proj"];
            Assert.NotEqual(0.0, layer.A("default").abs().sum().ToDouble());
            Assert.Equal(0.0, layer.B("default").abs().sum().ToDouble());
            Assert.True(before.Equals(model.Forward(x)), $"init {init} changed the output");
        }
    }

    [Fact]
    public void Gaussian_init_has_std_one_over_r_and_kaiming_stays_in_bound()
    {
        using var model = new TinyModel();
        using var adapter = Lora.Attach(model, Lora.Options(r: 4, init: LoraInit.Gaussian, targets: "all-linear"));
        adapter.AddAdapter("k", Lora.Options(r: 4, targets: "all-linear"));
        var gaussian = torch.cat(adapter.Layers.Values.Select(l => l.A("default").flatten()).ToList());
        Assert.InRange(gaussian.std().ToDouble(), 0.2, 0.3); // 1/r = 0.25 over 192 samples
        var kaiming = torch.cat(adapter.Layers.Values.Select(l => l.A("k").flatten()).ToList());
        Assert.True(kaiming.abs().max().ToDouble() <= 1 / Math.Sqrt(TinyModel.DefaultHidden));
    }

    [Fact]
    public void Layers_follow_peft_structure_and_names()
    {
        using var model = new TinyModel();
        using var adapter = Lora.Attach(model, Lora.Options());
        var names = model.named_parameters().Select(p => p.name).ToHashSet();
        Assert.Contains("model.layers.0.self_attn.q_proj.base_layer.weight", names);
        Assert.Contains("model.layers.0.self_attn.q_proj.lora_A.default.weight", names);
        Assert.Contains("model.layers.1.self_attn.v_proj.lora_B.default.weight", names);
        Assert.IsType<LoraLinear>(model.get_submodule("model.layers.1.self_attn.v_proj"));
        Assert.IsType<Linear>(model.get_submodule("model.layers.1.self_attn.o_proj"));
        Assert.Equal(4, adapter.Layers.Count);
        var a = adapter.Layers["model.layers.0.self_attn.v_proj"];
        Assert.Equal([4L, TinyModel.DefaultHidden], a.A("default").shape);
        Assert.Equal([(long)TinyModel.DefaultHidden, 4L], a.B("default").shape);
    }

    [Fact]
    public void Disabled_adapter_gives_exactly_the_base_output()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        using var adapter = Lora.Attach(model, Lora.Options(init: LoraInit.Random));
        var adapted = model.Forward(x);
        Assert.False(adapted.allclose(baseline, 1e-3, 1e-3));
        adapter.Enabled = false;
        Assert.True(model.Forward(x).Equals(baseline));
        adapter.Enabled = true;
        Assert.True(model.Forward(x).Equals(adapted));
    }

    [Fact]
    public void Merged_output_equals_unmerged_and_unmerge_restores_weights()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        using var adapter = Lora.Attach(model, Lora.Options(init: LoraInit.Random));
        var weights = Lora.Snapshot(model);
        var unmerged = model.Forward(x);
        adapter.Merge();
        Assert.True(adapter.IsMerged);
        var q = adapter.Layers["model.layers.0.self_attn.q_proj"];
        Assert.False(((Linear)q.base_layer).weight.Equals(weights["model.layers.0.self_attn.q_proj.base_layer.weight"]));
        Assert.True(model.Forward(x).allclose(unmerged, 1e-5, 1e-5));
        adapter.Unmerge();
        Assert.False(adapter.IsMerged);
        foreach (var (name, p) in model.named_parameters())
            Assert.True(p.allclose(weights[name], 1e-6, 1e-6), name);
        Assert.True(model.Forward(x).allclose(unmerged, 1e-5, 1e-5));
    }

    [Fact]
    public void Fp32_adapters_on_a_bf16_base_keep_the_base_dtype()
    {
        using var model = new TinyModel(dtype: ScalarType.BFloat16);
        var x = TinyModel.Batch();
        using var adapter = Lora.Attach(model, Lora.Options(init: LoraInit.Random));
        var layer = adapter.Layers["model.layers.0.self_attn.q_proj"];
        Assert.Equal(ScalarType.Float32, layer.A("default").dtype);
        Assert.Equal(ScalarType.BFloat16, ((Linear)layer.base_layer).weight.dtype);
        var h = torch.randn([3, TinyModel.DefaultHidden], ScalarType.BFloat16);
        var y = layer.forward(h);
        Assert.Equal(ScalarType.BFloat16, y.dtype);
        // The adapter path runs in bf16 (fp32 master weights cast for the matmuls): within bf16 rounding of PEFT's
        // arithmetic (bf16 base output + fp32 adapter path, rounded once), and exactly the bf16 formula.
        var peft = layer.base_layer.forward(h).@float()
            .add(((Linear)layer.lora_B["default"]).forward(((Linear)layer.lora_A["default"]).forward(h.@float())).mul(layer.Scaling("default")));
        Assert.True(y.@float().allclose(peft, 2e-2, 2e-2));
        var a16 = layer.A("default").bfloat16();
        var b16 = layer.B("default").bfloat16();
        var bf16 = torchx.addmm(layer.base_layer.forward(h), torch.nn.functional.linear(h, a16), b16.t(), 1.0, layer.Scaling("default"));
        Assert.True(y.Equals(bf16));
        var unmerged = model.Forward(x).@float();
        adapter.Merge();
        Assert.Equal(ScalarType.BFloat16, ((Linear)layer.base_layer).weight.dtype);
        Assert.True(model.Forward(x).@float().allclose(unmerged, 0.05, 0.05));
    }

    [Fact]
    public void Scaling_is_alpha_over_r_or_over_sqrt_r_with_rslora_and_patterns_apply()
    {
        using var model = new TinyModel();
        using var adapter = Lora.Attach(model, Lora.Options(r: 4, alpha: 8));
        var rs = Lora.Options(r: 4, alpha: 8);
        rs.UseRslora = true;
        adapter.AddAdapter("rs", rs);
        var patterned = Lora.Options(r: 4, alpha: 8);
        patterned.RankPattern = new() { ["q_proj"] = 2 };
        patterned.AlphaPattern = new() { [@"layers\.1\.self_attn\.v_proj"] = 32 };
        adapter.AddAdapter("pat", patterned);

        var q0 = adapter.Layers["model.layers.0.self_attn.q_proj"];
        var v0 = adapter.Layers["model.layers.0.self_attn.v_proj"];
        var v1 = adapter.Layers["model.layers.1.self_attn.v_proj"];
        Assert.Equal(2.0, q0.Scaling("default"));
        Assert.Equal(4.0, q0.Scaling("rs")); // 8 / √4
        Assert.Equal(2, q0.Rank("pat"));
        Assert.Equal(4.0, q0.Scaling("pat")); // 8 / 2
        Assert.Equal(4, v0.Rank("pat"));
        Assert.Equal(2.0, v0.Scaling("pat"));
        Assert.Equal(8.0, v1.Scaling("pat")); // 32 / 4
    }

    [Fact]
    public void Dispose_unloads_and_restores_the_base_model()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        var adapter = Lora.Attach(model, Lora.Options(init: LoraInit.Random));
        adapter.Merge();
        adapter.Dispose();
        Assert.IsType<Linear>(model.get_submodule("model.layers.0.self_attn.q_proj"));
        Assert.DoesNotContain(model.named_parameters(), p => p.name.Contains("lora_"));
        Assert.True(model.Forward(x).allclose(baseline, 1e-5, 1e-5));
        using var again = Lora.Attach(model, Lora.Options());
        Assert.Equal(4, again.Layers.Count);
    }

    [Fact]
    public void Gpt2_conv1d_layers_are_wrapped_merged_and_recorded_as_fan_in_fan_out()
    {
        var folder = Path.Combine(RepoRoot(), "tests", "LoRAHub.Models.Tests", "fixtures", "gpt2");
        using var model = LoRAHub.Models.PretrainedModel.Load(folder);
        var ids = torch.tensor(new long[] { 1, 5, 9, 2 }, [1, 4]);
        var baseline = model.Forward(ids);
        using var adapter = (LoraAdapter)new LoraMethod().Attach(model,
            new LoraOptions { R = 2, LoraAlpha = 4, InitLoraWeights = LoraInit.Random, TargetModules = new[] { "c_attn", "c_fc" } });
        var layer = adapter.Layers.First(l => l.Key.EndsWith("c_attn")).Value;
        Assert.Equal("Conv1D", layer.base_layer.TypeName());
        // y = x·W + b + s·B·A·x with W stored in×out.
        var x = torch.randn([3, layer.base_linear.in_features]);
        var expected = layer.base_layer.forward(x).add(x.matmul(layer.DeltaWeight("default").t()));
        Assert.True(layer.forward(x).allclose(expected, 1e-5, 1e-5));
        var adapted = model.Forward(ids);
        Assert.False(adapted.allclose(baseline, 1e-3, 1e-3));
        adapter.Merge();
        Assert.True(model.Forward(ids).allclose(adapted, 1e-4, 1e-4));
        adapter.Unmerge();
        adapter.Enabled = false;
        Assert.True(model.Forward(ids).allclose(baseline, 1e-5, 1e-5));
        adapter.Enabled = true;
        var dir = Lora.TempDir();
        adapter.Save(dir);
        using var doc = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json")));
        Assert.True(doc.RootElement.GetProperty("fan_in_fan_out").GetBoolean()); // as PEFT records Conv1D targets
    }

    private static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "LoRAHub.sln"))) dir = dir.Parent;
        return dir?.FullName ?? throw new DirectoryNotFoundException("LoRAHub.sln not found above " + AppContext.BaseDirectory);
    }
}
