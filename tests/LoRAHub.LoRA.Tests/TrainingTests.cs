using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.LoRA.Tests;

public class TrainingTests
{
    [Fact]
    public void Adamw_steps_change_the_output_lower_the_loss_and_touch_only_adapter_tensors()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var y = TinyModel.Batch(seed: 2);
        var before = model.Forward(x);
        using var adapter = Lora.Attach(model, Lora.Options(targets: "all-linear"));
        var baseWeights = Lora.Snapshot(model).Where(kv => !kv.Key.Contains("lora_")).ToList();
        using var optimizer = new AdamW(adapter.ParameterGroups(0.05, 0.0));

        var losses = new List<double>();
        for (var step = 0; step < 15; step++)
        {
            using var scope = torch.NewDisposeScope();
            optimizer.zero_grad();
            var loss = model.Loss(x, y);
            loss.backward();
            if (step == 0)
                foreach (var (name, p) in model.named_parameters())
                {
                    using var g = p.grad;
                    if (name.Contains(".lora_")) Assert.True(g is not null, $"{name} got no gradient");
                    else Assert.True(g is null, $"base parameter {name} got a gradient");
                }
            optimizer.step();
            losses.Add(loss.ToDouble());
        }

        Assert.True(losses[^1] < losses[0] - 0.1, $"loss {losses[0]} -> {losses[^1]}");
        Assert.False(model.Forward(x).allclose(before, 1e-4, 1e-4));
        foreach (var (name, original) in baseWeights)
            Assert.True(model.named_parameters().Single(p => p.name == name).parameter.Equals(original), $"{name} changed");
        foreach (var (name, p) in model.named_parameters())
            Assert.Equal(name.Contains(".lora_"), p.requires_grad);
    }

    [Fact]
    public void Two_adapters_switch_cleanly()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        using var adapter = Lora.Attach(model, Lora.Options(init: LoraInit.Random));
        adapter.AddAdapter("other", Lora.Options(r: 2, init: LoraInit.Random, targets: new[] { "o_proj" }));
        Assert.Equal("default", adapter.ActiveAdapter);
        var first = model.Forward(x);

        adapter.SetActiveAdapter("other");
        var second = model.Forward(x);
        Assert.False(second.allclose(first, 1e-3, 1e-3));
        Assert.False(second.allclose(baseline, 1e-3, 1e-3));
        var trainable = adapter.ParameterGroups(1e-3, 0).SelectMany(g => g.Parameters).ToList();
        Assert.Equal(4, trainable.Count); // A and B of two o_proj layers
        Assert.All(trainable, t => Assert.Equal(TinyModel.DefaultHidden * 2, t.numel()));
        Assert.False(adapter.Layers["model.layers.0.self_attn.q_proj"].A("default").requires_grad);
        Assert.True(adapter.Layers["model.layers.0.self_attn.o_proj"].A("other").requires_grad);

        adapter.SetActiveAdapter("default");
        Assert.True(model.Forward(x).Equals(first));
    }

    [Fact]
    public void Loraplus_puts_b_matrices_in_a_group_with_16_times_the_lr()
    {
        using var model = new TinyModel();
        var options = Lora.Options();
        options.LoraplusLrRatio = 16;
        using var adapter = Lora.Attach(model, options);
        var groups = adapter.ParameterGroups(1e-3, 0.01);
        var a = groups.Single(g => g.Name == "groupA");
        var b = groups.Single(g => g.Name == "groupB");
        Assert.Equal(2, groups.Count);
        Assert.Equal(1e-3, a.lr);
        Assert.Equal(16e-3, b.lr, 12);
        Assert.Equal(16.0, b.lr / a.lr, 12);
        Assert.Equal(0.01, b.weight_decay);
        var bs = adapter.Layers.Values.Select(l => l.B("default")).ToList();
        Assert.Equal(4, b.Parameters.Count);
        Assert.All(b.Parameters, p => Assert.Contains(p, bs));
        Assert.All(a.Parameters, p => Assert.DoesNotContain(p, bs));
    }

    [Fact]
    public void Trainable_report_matches_peft()
    {
        using var model = new TinyModel();
        var baseCount = model.parameters().Sum(p => p.numel());
        using var adapter = Lora.Attach(model, Lora.Options(r: 2));
        const long trainable = 4 * (2 * TinyModel.DefaultHidden + TinyModel.DefaultHidden * 2);
        Assert.Equal(trainable, adapter.TrainableParameterCount);
        Assert.Equal(baseCount + trainable, adapter.ModelParameterCount);
        var pct = (100.0 * trainable / (baseCount + trainable)).ToString("0.0000", System.Globalization.CultureInfo.InvariantCulture);
        Assert.Equal($"trainable params: {trainable} || all params: {baseCount + trainable} || trainable%: {pct}", adapter.TrainableParametersReport());
    }

    [Fact]
    public void Bias_all_trains_and_saves_every_bias_and_lora_only_the_adapted_ones()
    {
        using var model = new TinyModel(bias: true);
        var options = Lora.Options(targets: new[] { "q_proj" });
        options.Bias = "all";
        using var adapter = Lora.Attach(model, options);
        var keys = adapter.StateDict().Keys.ToHashSet();
        Assert.Contains("base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias", keys);
        Assert.Contains("base_model.model.model.layers.0.self_attn.o_proj.bias", keys);
        Assert.Equal(6, keys.Count(k => k.EndsWith(".bias")));
        Assert.True(model.get_submodule("model.layers.1.self_attn.v_proj")!.named_parameters().Single(p => p.name == "bias").parameter.requires_grad);

        var only = Lora.Options(targets: new[] { "q_proj" });
        only.Bias = "lora_only";
        adapter.AddAdapter("only", only);
        adapter.SetActiveAdapter("only");
        Assert.Equal(2, adapter.StateDict().Keys.Count(k => k.EndsWith(".base_layer.bias")));
        Assert.Equal(2, adapter.StateDict().Keys.Count(k => k.EndsWith(".bias")));
        Assert.False(model.get_submodule("model.layers.1.self_attn.v_proj")!.named_parameters().Single(p => p.name == "bias").parameter.requires_grad);
    }

    [Fact]
    public void Weighted_cat_combination_is_exact()
    {
        using var model = new TinyModel();
        using var adapter = Lora.Attach(model, Lora.Options(r: 2, alpha: 4, init: LoraInit.Random));
        adapter.AddAdapter("b", Lora.Options(r: 3, alpha: 12, init: LoraInit.Random, targets: new[] { "v_proj", "o_proj" }));
        adapter.AddWeightedAdapter("mix", ["default", "b"], [0.7, -0.3]);

        var v = adapter.Layers["model.layers.1.self_attn.v_proj"];
        Assert.Equal(5, v.Rank("mix"));
        Assert.Equal(1.0, v.Scaling("mix"));
        var expected = v.DeltaWeight("default").mul(0.7).add(v.DeltaWeight("b").mul(-0.3));
        Assert.True(v.DeltaWeight("mix").allclose(expected, 1e-6, 1e-6));
        var q = adapter.Layers["model.layers.0.self_attn.q_proj"]; // only in "default": zero rows pad it
        Assert.True(q.DeltaWeight("mix").allclose(q.DeltaWeight("default").mul(0.7), 1e-6, 1e-6));
        var o = adapter.Layers["model.layers.0.self_attn.o_proj"];
        Assert.True(o.DeltaWeight("mix").allclose(o.DeltaWeight("b").mul(-0.3), 1e-6, 1e-6));

        var h = torch.randn(3, TinyModel.DefaultHidden);
        adapter.SetActiveAdapter("mix");
        var mixed = v.forward(h);
        var byHand = v.base_layer.forward(h).add(h.matmul(expected.t()));
        Assert.True(mixed.allclose(byHand, 1e-5, 1e-5));
    }
}
