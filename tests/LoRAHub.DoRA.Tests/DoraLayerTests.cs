using F = TorchSharp.torch.nn.functional;

namespace LoRAHub.DoRA.Tests;

public class DoraLayerTests
{
    [Theory]
    [InlineData(DoraNormMethod.Factored, false)]
    [InlineData(DoraNormMethod.Direct, false)]
    [InlineData(DoraNormMethod.Factored, true)]
    public void Output_equals_the_base_at_init(DoraNormMethod norm, bool bias)
    {
        foreach (var init in new[] { LoraInit.Default, LoraInit.Gaussian })
        {
            using var model = new TinyModel(bias: bias);
            var x = TinyModel.Batch();
            var before = model.Forward(x);
            using var adapter = Dora.Attach(model, Dora.Options(init: init, norm: norm, targets: "all-linear"));
            var q = adapter.Layers[Dora.Q0];
            Assert.Equal(0.0, q.B("default").abs().sum().ToDouble());
            Assert.True(before.Equals(model.Forward(x)), $"init {init}, {norm}, bias {bias} changed the output");
        }
    }

    [Fact]
    public void Magnitude_starts_at_the_row_norms_and_follows_peft_names()
    {
        using var model = new TinyModel();
        var w0 = ((Linear)model.get_submodule(Dora.Q0)!).weight.detach().clone();
        using var adapter = Dora.Attach(model, Dora.Options());
        var names = model.named_parameters().Select(p => p.name).ToHashSet();
        Assert.Contains(Dora.Q0 + ".lora_magnitude_vector.default.weight", names);
        Assert.Contains(Dora.Q0 + ".lora_A.default.weight", names);
        Assert.Contains(Dora.Q0 + ".base_layer.weight", names);
        var m = Dora.Magnitude(adapter.Layers[Dora.Q0]);
        Assert.Equal([(long)TinyModel.DefaultHidden], m.shape);
        Assert.Equal(ScalarType.Float32, m.dtype);
        Assert.True(m.requires_grad);
        Assert.True(m.allclose(w0.norm(dim: 1), 1e-6, 1e-6), m.str());
        // Random init (B ≠ 0): m = ‖W0 + s·B·A‖, so the layer starts as plain LoRA (PEFT's update_layer).
        adapter.AddAdapter("random", Dora.Options(init: LoraInit.Random));
        var layer = adapter.Layers[Dora.Q0];
        var v = w0.add(layer.B("random").matmul(layer.A("random")), alpha: layer.Scaling("random"));
        Assert.True(Dora.Magnitude(layer, "random").allclose(v.norm(dim: 1), 1e-5, 1e-6));
    }

    [Fact]
    public void Forward_is_m_times_V_over_its_row_norms_plus_bias()
    {
        using var model = new TinyModel(dtype: ScalarType.Float64, bias: true);
        using var adapter = Dora.Attach(model, Dora.Options(init: LoraInit.Random));
        Dora.PerturbMagnitudes(adapter);
        model.eval();
        var layer = adapter.Layers[Dora.Q0];
        var x = torch.randn([3, 2, TinyModel.DefaultHidden], ScalarType.Float64);
        var expected = F.linear(x, Dora.MergedWeight(layer), layer.base_linear.bias);
        Assert.True(layer.forward(x).allclose(expected, 1e-12, 1e-12));
    }

    [Theory]
    [InlineData(ScalarType.Float64, 1e-13)]
    [InlineData(ScalarType.Float32, 2e-6)]
    public void Factored_norm_equals_the_direct_norm(ScalarType dtype, double tolerance)
    {
        torchx.manual_seed(3);
        // Shapes where A·Aᵀ and W0·Aᵀ matter: B of the size training reaches, a large and a near-zero row.
        var w0 = torch.randn([48, 40], dtype).mul(0.05);
        using (torch.no_grad()) w0.narrow(0, 5, 1).mul_(1e-4);
        var a = torch.randn([6, 40], dtype).mul(0.2);
        var b = torch.randn([48, 6], dtype).mul(0.1);
        const double s = 2.5;
        var fast = DoraWeightNorm.Factored(w0, DoraWeightNorm.RowNormsSquared(w0, DoraWeightNorm.AccumulationType(a)), a, b, s);
        var direct = DoraWeightNorm.Direct(w0, a, b, s);
        var exact = w0.to(ScalarType.Float64).add(b.to(ScalarType.Float64).matmul(a.to(ScalarType.Float64)), alpha: s).norm(dim: 1);
        Assert.Equal(DoraWeightNorm.AccumulationType(a), fast.dtype);
        Assert.True(fast.to(ScalarType.Float64).allclose(exact, tolerance, tolerance), fast.sub(direct).abs().max().str());
        Assert.True(direct.to(ScalarType.Float64).allclose(exact, tolerance, tolerance));
        Assert.True(fast.allclose(direct, tolerance, tolerance));
        // The rows that cancel to zero stay finite: the squared norm is clamped at 0 before the square root.
        var zero = DoraWeightNorm.Factored(torch.zeros([2, 40], dtype), torch.zeros([2], DoraWeightNorm.AccumulationType(a)), a, torch.zeros([2, 6], dtype), s);
        Assert.True(zero.eq(0).all().item<bool>());
    }

    [Fact]
    public void Factored_norm_of_a_bf16_base_with_fp32_adapters_is_within_bf16_output_rounding()
    {
        torchx.manual_seed(4);
        var w0 = torch.randn([64, 96]).mul(0.05).bfloat16();
        var a = torch.randn([8, 96]).mul(0.1);
        var b = torch.randn([64, 8]).mul(0.05);
        const double s = 2;
        var exact = w0.to(ScalarType.Float64).add(b.to(ScalarType.Float64).matmul(a.to(ScalarType.Float64)), alpha: s).norm(dim: 1);
        var fast = DoraWeightNorm.Factored(w0, DoraWeightNorm.RowNormsSquared(w0, ScalarType.Float32), a, b, s);
        var direct = DoraWeightNorm.Direct(w0, a, b, s);
        Assert.Equal(ScalarType.Float32, fast.dtype);
        var fastError = fast.to(ScalarType.Float64).sub(exact).abs().div(exact).max().ToDouble();
        var directError = direct.to(ScalarType.Float64).sub(exact).abs().div(exact).max().ToDouble();
        Assert.True(directError < 1e-6, $"direct {directError}");
        Assert.True(fastError < 1.0 / 512, $"factored {fastError}"); // below bf16's half-ulp
    }

    [Fact]
    public void Disabled_adapter_gives_exactly_the_base_output()
    {
        using var model = new TinyModel(bias: true);
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        using var adapter = Dora.Attach(model, Dora.Options(init: LoraInit.Random));
        Dora.PerturbMagnitudes(adapter);
        var adapted = model.Forward(x);
        Assert.False(adapted.allclose(baseline, 1e-3, 1e-3));
        adapter.Enabled = false;
        Assert.True(model.Forward(x).Equals(baseline));
        adapter.Enabled = true;
        Assert.True(model.Forward(x).Equals(adapted));
    }

    [Theory]
    [InlineData(DoraNormMethod.Factored)]
    [InlineData(DoraNormMethod.Direct)]
    public void Merged_output_equals_unmerged_and_unmerge_restores_weights(DoraNormMethod norm)
    {
        using var model = new TinyModel(bias: true);
        var x = TinyModel.Batch();
        using var adapter = Dora.Attach(model, Dora.Options(init: LoraInit.Random, norm: norm));
        Dora.PerturbMagnitudes(adapter);
        var weights = Dora.Snapshot(model);
        var unmerged = model.Forward(x);
        var q = adapter.Layers[Dora.Q0];
        var definition = Dora.MergedWeight(q);
        adapter.Merge();
        Assert.True(adapter.IsMerged);
        Assert.True(((Linear)q.base_layer).weight.to(ScalarType.Float64).allclose(definition, 1e-5, 1e-6));
        Assert.True(model.Forward(x).allclose(unmerged, 1e-5, 1e-5));
        adapter.Unmerge();
        Assert.False(adapter.IsMerged);
        foreach (var (name, p) in model.named_parameters())
            Assert.True(p.allclose(weights[name], 1e-5, 1e-6), name);
        Assert.True(model.Forward(x).allclose(unmerged, 1e-5, 1e-5));
        // The W0 cache follows the weight through merge/unmerge: forward again after a second round trip.
        adapter.Merge();
        adapter.Unmerge();
        Assert.True(model.Forward(x).allclose(unmerged, 1e-5, 1e-5));
    }

    [Fact]
    public void Bf16_base_with_fp32_adapters_runs_in_bf16_close_to_the_fp64_definition()
    {
        using var model = new TinyModel(dtype: ScalarType.BFloat16, bias: true);
        using var adapter = Dora.Attach(model, Dora.Options(init: LoraInit.Random));
        Dora.PerturbMagnitudes(adapter);
        var layer = adapter.Layers[Dora.Q0];
        Assert.Equal(ScalarType.Float32, layer.A("default").dtype);
        Assert.Equal(ScalarType.Float32, Dora.Magnitude(layer).dtype);
        var h = torch.randn([5, TinyModel.DefaultHidden]).bfloat16();
        var y = layer.forward(h);
        Assert.Equal(ScalarType.BFloat16, y.dtype);
        var expected = F.linear(h.to(ScalarType.Float64), Dora.MergedWeight(layer), layer.base_linear.bias!.to(ScalarType.Float64));
        Assert.True(y.to(ScalarType.Float64).allclose(expected, 3e-2, 3e-2), y.str() + expected.str());
        var unmerged = model.Forward(TinyModel.Batch()).@float();
        adapter.Merge();
        Assert.Equal(ScalarType.BFloat16, ((Linear)layer.base_layer).weight.dtype);
        Assert.True(model.Forward(TinyModel.Batch()).@float().allclose(unmerged, 0.05, 0.05));
    }

    [Fact]
    public void The_magnitude_ratio_is_not_rounded_to_bf16_around_one()
    {
        // m/‖V‖ = 1.02 rounds to 1.0234 in bf16 (0.3% off); m/‖V‖ − 1 formed in fp32 keeps 0.02 to 3 digits.
        using var model = new TinyModel(dtype: ScalarType.BFloat16);
        using var adapter = Dora.Attach(model, Dora.Options());
        var layer = adapter.Layers[Dora.Q0];
        var h = torch.randn([256, TinyModel.DefaultHidden]).bfloat16();
        var before = layer.forward(h).to(ScalarType.Float64);
        using (torch.no_grad()) Dora.Magnitude(layer).mul_(1.02);
        var after = layer.forward(h).to(ScalarType.Float64);
        // Least-squares slope of the change against the output.
        var gain = after.sub(before).mul(before).sum().ToDouble() / before.square().sum().ToDouble();
        Assert.InRange(gain, 0.019, 0.021);
    }

    [Fact]
    public void Active_dropout_applies_w0_to_the_dropped_input_as_peft_does()
    {
        using var model = new TinyModel(dtype: ScalarType.Float64, bias: true);
        var options = Dora.Options(init: LoraInit.Random);
        options.LoraDropout = 0.3;
        using var adapter = Dora.Attach(model, options);
        Dora.PerturbMagnitudes(adapter);
        var layer = adapter.Layers[Dora.Q0];
        var x = torch.randn([6, TinyModel.DefaultHidden], ScalarType.Float64);
        torchx.manual_seed(11);
        var y = layer.forward(x);
        torchx.manual_seed(11);
        var xd = F.dropout(x, 0.3, true);
        var w0 = layer.base_linear.dense_weight();
        var s = layer.Scaling("default");
        var v = w0.add(layer.B("default").matmul(layer.A("default")), alpha: s);
        var f = Dora.Magnitude(layer).div(v.norm(dim: 1));
        var lora = F.linear(F.linear(xd, layer.A("default")), layer.B("default")).mul(s);
        var expected = layer.base_layer.forward(x).add(F.linear(xd, w0).mul(f.sub(1))).add(lora.mul(f));
        Assert.True(y.allclose(expected, 1e-12, 1e-12));
        Assert.False(xd.Equals(x));
        // In eval mode dropout is the identity and the base output is reused.
        model.eval();
        Assert.True(layer.forward(x).allclose(F.linear(x, Dora.MergedWeight(layer), layer.base_linear.bias), 1e-12, 1e-12));
    }

    [Fact]
    public void Scaling_options_apply_to_dora_layers()
    {
        using var model = new TinyModel();
        var options = Dora.Options(r: 4, alpha: 8);
        options.UseRslora = true;
        options.RankPattern = new() { ["v_proj"] = 2 };
        using var adapter = Dora.Attach(model, options);
        Assert.Equal(4.0, adapter.Layers[Dora.Q0].Scaling("default")); // 8 / √4
        var v = adapter.Layers["model.layers.1.self_attn.v_proj"];
        Assert.Equal(2, v.Rank("default"));
        Assert.Equal(8 / Math.Sqrt(2), v.Scaling("default"), 12);
        Assert.Equal([(long)TinyModel.DefaultHidden], Dora.Magnitude(v).shape);
    }
}
