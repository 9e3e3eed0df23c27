using static LoRAHub.OwnModel.Tests.Helpers;

namespace LoRAHub.OwnModel.Tests;

/// <summary>
/// A user's own TorchSharp model, wrapped with TorchSharpModel.Wrap, goes through what our models go through: attach,
/// train with a plain AdamW loop, save in PEFT's format, reload onto a fresh copy, merge, unload.
/// </summary>
public class AdapterCycleTests
{
    [Theory]
    [InlineData("lora", "mlp")]
    [InlineData("dora", "mlp")]
    [InlineData("lora", "transformer")]
    [InlineData("dora", "transformer")]
    public void Attach_train_save_reload_and_merge_on_cpu(string method, string model) => Cycle(Method(method), UserModel.Get(model), CPU);

    [Theory]
    [InlineData("lora", "mlp")]
    [InlineData("dora", "transformer")]
    public void Attach_train_save_reload_and_merge_on_cuda(string method, string model)
    {
        if (!cuda.is_available()) return;
        Cycle(Method(method), UserModel.Get(model), CUDA);
    }

    private static void Cycle(IAdapterMethod method, UserModel user, Device device)
    {
        var (x, y) = user.Data(device);
        using var model = user.Build(0, device);
        var baseOut = Forward(model, x);
        var baseWeights = Snapshot(model);

        using var adapter = method.Attach(TorchSharpModel.Wrap(model, name: $"tests/{user.Kind}", outputModules: user.Heads),
            new { r = 4, lora_alpha = 8, target_modules = user.Targets });

        // Every target is wrapped and nothing else; the adapter starts as the identity (B = 0) and only it trains.
        var layers = ((LoraAdapter)adapter).Layers.Keys.ToList();
        Assert.NotEmpty(layers);
        Assert.All(layers, path => Assert.Contains(path.Split('.')[^1], user.Targets));
        Assert.Equal(user.Targets.Order(), layers.Select(p => p.Split('.')[^1]).Distinct().Order());
        Assert.True(Forward(model, x).allclose(baseOut, 1e-5, 1e-6), $"attached adapter changed the output by {MaxDiff(Forward(model, x), baseOut)}");
        foreach (var (name, p) in model.named_parameters()) Assert.True(IsAdapterKey(name) == p.requires_grad, $"{name}: requires_grad {p.requires_grad}");

        using var optimizer = new AdamW(adapter.ParameterGroups(1e-2, 0.0));
        var losses = new List<double>();
        model.train();
        for (var step = 0; step < 30; step++)
        {
            using var scope = NewDisposeScope();
            adapter.OnStepBegin(step);
            optimizer.zero_grad();
            var loss = user.Loss(model.call(x), y);
            loss.backward();
            adapter.OnAfterBackward(step);
            optimizer.step();
            adapter.OnStepEnd(step);
            losses.Add(loss.to(ScalarType.Float64).item<double>());
        }
        model.eval();
        Assert.True(losses[^1] < 0.8 * losses[0], $"loss {losses[0]} -> {losses[^1]}");
        var adapted = Forward(model, x);
        Assert.False(adapted.allclose(baseOut, 1e-3, 1e-3), "training did not change the output");
        var afterTraining = PlainWeights(model);
        foreach (var (name, original) in baseWeights) Assert.True(Same(afterTraining[name], original), $"base weight {name} changed");

        // PEFT's folder, loaded onto a fresh copy of the base model (same seed, so the same weights): identical outputs.
        var dir = TempDir();
        adapter.Save(dir);
        Assert.True(File.Exists(Path.Combine(dir, "adapter_config.json")));
        Assert.True(File.Exists(Path.Combine(dir, "adapter_model.safetensors")));
        using (var fresh = user.Build(0, device))
        {
            Assert.True(Same(Forward(fresh, x), baseOut));
            using var reloaded = method.Load(TorchSharpModel.Wrap(fresh, outputModules: user.Heads), dir);
            Assert.True(Same(Forward(fresh, x), adapted), $"reloaded adapter differs by {MaxDiff(Forward(fresh, x), adapted)}");
            var trained = adapter.StateDict();
            Assert.Equal(trained.Keys.Order(), reloaded.StateDict().Keys.Order());
            foreach (var (key, t) in reloaded.StateDict()) Assert.True(Same(t, trained[key]), key);
        }

        // Merged: the same outputs from the base weights alone, and those weights make a plain model (no adapter layers).
        adapter.Merge();
        var merged = Forward(model, x);
        Assert.True(merged.allclose(adapted, 1e-4, 1e-5), $"merged output differs by {MaxDiff(merged, adapted)}");
        var mergedFile = Path.Combine(dir, "merged.safetensors");
        torchx.save_safetensors(PlainWeights(model), mergedFile);
        using (var plain = user.Build(1, device))
        {
            torchx.load_safetensors_into(plain.state_dict(), mergedFile);
            Assert.True(Forward(plain, x).allclose(adapted, 1e-4, 1e-5), $"plain merged model differs by {MaxDiff(Forward(plain, x), adapted)}");
        }

        // Unloading unmerges and puts the user's own layers back.
        adapter.Dispose();
        Assert.DoesNotContain(model.named_modules(), m => m.module is LoraLinear);
        Assert.Equal(baseWeights.Keys.Order(), model.state_dict().Keys.Order());
        Assert.True(Forward(model, x).allclose(baseOut, 1e-5, 1e-5), $"unloaded model differs from the base by {MaxDiff(Forward(model, x), baseOut)}");
        Directory.Delete(dir, recursive: true);
    }
}
