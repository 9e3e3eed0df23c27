using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.DoRA.Tests;

public class TrainingTests
{
    [Theory]
    [InlineData(DoraNormMethod.Factored, true)]
    [InlineData(DoraNormMethod.Direct, false)]
    public void Adamw_steps_lower_the_loss_move_the_magnitudes_and_touch_only_adapter_tensors(DoraNormMethod norm, bool detach)
    {
        using var model = new TinyModel(bias: true);
        var x = TinyModel.Batch();
        var y = TinyModel.Batch(seed: 2);
        using var adapter = Dora.Attach(model, Dora.Options(targets: "all-linear", norm: norm, detach: detach));
        var baseWeights = Dora.Snapshot(model).Where(kv => !kv.Key.Contains("lora_")).ToList();
        var magnitudes = adapter.Layers.ToDictionary(l => l.Key, l => Dora.Magnitude(l.Value).detach().clone());
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
        foreach (var (path, before) in magnitudes)
            Assert.False(Dora.Magnitude(adapter.Layers[path]).allclose(before, 1e-4, 1e-4), $"m of {path} did not change");
        foreach (var (name, original) in baseWeights)
            Assert.True(model.named_parameters().Single(p => p.name == name).parameter.Equals(original), $"{name} changed");
        foreach (var (name, p) in model.named_parameters())
            Assert.Equal(name.Contains(".lora_"), p.requires_grad);
    }

    [Fact]
    public void Magnitudes_train_without_weight_decay_and_loraplus_gives_them_the_b_learning_rate()
    {
        using var model = new TinyModel();
        using var adapter = Dora.Attach(model, Dora.Options());
        var magnitudes = adapter.Layers.Values.Select(l => Dora.Magnitude(l)).ToList();
        var plain = adapter.ParameterGroups(1e-3, 0.01);
        var noDecay = plain.Single(g => g.Name == "no_decay");
        Assert.Equal(0.0, noDecay.weight_decay);
        Assert.Equal(magnitudes.Count, noDecay.Parameters.Count);
        Assert.All(magnitudes, m => Assert.Contains(m, noDecay.Parameters));
        // r·(in + out) + out per layer.
        Assert.Equal(4 * (4 * (TinyModel.DefaultHidden + TinyModel.DefaultHidden) + TinyModel.DefaultHidden), adapter.TrainableParameterCount);

        var options = Dora.Options();
        options.LoraplusLrRatio = 16;
        adapter.AddAdapter("plus", options);
        adapter.SetActiveAdapter("plus");
        var groups = adapter.ParameterGroups(1e-3, 0.01);
        var vectors = groups.Single(g => g.Name == "groupB_no_decay");
        Assert.Equal(16e-3, vectors.lr, 12);
        Assert.All(adapter.Layers.Values, l => Assert.Contains(Dora.Magnitude(l, "plus"), vectors.Parameters));
        Assert.All(adapter.Layers.Values, l => Assert.False(Dora.Magnitude(l, "default").requires_grad));
    }

    [Fact]
    public void Dora_and_lora_adapters_switch_cleanly_and_weighted_combination_is_refused()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        var dora = new DoraMethod();
        using var adapter = dora.CreateAdapter(model);
        adapter.AddAdapter("dora", Dora.Options(init: LoraInit.Random));
        Dora.PerturbMagnitudes(adapter, name: "dora");
        adapter.AddAdapter("lora", new LoraOptions { InitLoraWeights = LoraInit.Random, TargetModules = new[] { "q_proj", "v_proj" } });
        var first = model.Forward(x);
        adapter.SetActiveAdapter("lora");
        var second = model.Forward(x);
        Assert.False(second.allclose(first, 1e-3, 1e-3));
        Assert.False(second.allclose(baseline, 1e-3, 1e-3));
        Assert.Null(adapter.Layers[Dora.Q0].Variant("lora"));
        adapter.SetActiveAdapter("dora");
        Assert.True(model.Forward(x).Equals(first));
        var e = Assert.Throws<InvalidOperationException>(() => adapter.AddWeightedAdapter("mix", ["dora", "lora"], [0.5, 0.5]));
        Assert.Contains("use_dora", e.Message);
    }

    [Fact]
    public void Dispose_unloads_and_restores_the_base_model()
    {
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        var adapter = Dora.Attach(model, Dora.Options(init: LoraInit.Random));
        Dora.PerturbMagnitudes(adapter);
        adapter.Merge();
        adapter.Dispose();
        Assert.IsType<Linear>(model.get_submodule(Dora.Q0));
        Assert.DoesNotContain(model.named_parameters(), p => p.name.Contains("lora_"));
        Assert.True(model.Forward(x).allclose(baseline, 1e-5, 1e-5));
    }

    [Fact]
    public void Bad_options_name_the_option()
    {
        using var model = new TinyModel();
        var options = Dora.Options();
        options.NormMethod = (DoraNormMethod)7;
        var e = Assert.Throws<AdapterConfigurationException>(() => Dora.Attach(model, options));
        Assert.Contains("norm_method", e.Message);
        Assert.IsType<Linear>(model.get_submodule(Dora.Q0));
        var bound = (DoraOptions)new DoraMethod().CreateDefaultOptions();
        Assert.True(bound.DetachNorm);
        var fromScript = OptionsBinder.Bind<DoraOptions>(new { r = 2, lora_alpha = 4, target_modules = new[] { "q_proj" }, norm_method = "Direct", detach_norm = false });
        Assert.Equal(DoraNormMethod.Direct, fromScript.NormMethod);
        Assert.False(fromScript.DetachNorm);
        Assert.Equal(2, fromScript.R);
    }
}
