using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.HeadLoRA.Tests;

/// <summary>
/// The adaptive mode on a task where only some heads matter: the teacher is the tiny model with the q_proj rows of heads
/// 0 and 1 changed (both blocks), the student learns it through per-head adapters on q_proj, and the budget (init_r 4 →
/// target_r 2 per head) must end up on heads 0 and 1.
/// </summary>
public sealed class AdaptiveTests
{
    private static HeadLoraOptions Options() => new()
    {
        Adaptive = true, InitR = 4, TargetR = 2, TotalStep = 60, Tinit = 5, Tfinal = 10, DeltaT = 2, LoraAlpha = 4, HeadDim = 2,
        TargetModules = TargetModuleSpec.FromNames(["q_proj"]),
    };

    [Fact]
    public void Rank_moves_to_the_heads_that_matter_and_the_final_ranks_are_saved()
    {
        using var scope = NewDisposeScope();
        using var temp = new TempDir();
        using var teacher = new TinyModel();
        torchx.manual_seed(7);
        using (no_grad())
            foreach (var layer in new[] { 0, 1 })
            {
                var w = ((TorchSharp.Modules.Linear)teacher.get_submodule($"model.layers.{layer}.self_attn.q_proj")!).weight!;
                w.narrow(0, 0, 4).add_(randn(4, 8) * 0.8); // rows 0..3: heads 0 and 1 of head_dim 2
            }
        var xs = Enumerable.Range(0, 4).Select(i => TinyModel.Batch(seed: 20 + i, batch: 4, length: 6)).ToArray();
        var targets = xs.Select(x => teacher.Forward(x).detach()).ToArray();

        using var model = new TinyModel();
        using var adapter = (HeadLoraAdapter)new HeadLoraMethod().Attach(model, Options());
        Assert.Equal(32, adapter.Allocator!.Schedule.Initial); // 2 blocks × 4 heads × init_r 4
        Assert.Equal(16, adapter.Allocator.Schedule.Target);
        model.train();
        using var optimizer = new AdamW(adapter.ParameterGroups(3e-2, 0.0));
        float first = 0, last = 0;
        for (var step = 0; step < 60; step++)
        {
            using var stepScope = NewDisposeScope();
            var loss = model.Forward(xs[step % 4]).sub(targets[step % 4]).pow(2).mean();
            loss.backward();
            adapter.OnAfterBackward(step);
            optimizer.step();
            optimizer.zero_grad();
            adapter.OnStepEnd(step);
            if (step == 0) first = loss.item<float>();
            last = loss.item<float>();
        }
        Assert.True(last < first * 0.5, $"loss {first} → {last}");

        var ranks = adapter.EffectiveHeadRanks();
        Assert.Equal(16, ranks.Values.Sum(r => r.Sum()));
        foreach (var (path, r) in ranks)
        {
            Assert.True(r[0] + r[1] > r[2] + r[3], $"{path}: ranks [{string.Join(", ", r)}] should sit on heads 0 and 1");
            var e = adapter.Layers[path].E!;
            Assert.Equal(r.Sum(), (int)e.ne(0).sum().item<long>()); // masked components have E = 0
        }

        model.eval();
        var trained = model.Forward(xs[0]);
        adapter.Save(temp.Path);
        var config = File.ReadAllText(Path.Combine(temp.Path, HeadLoraOptions.ConfigFileName));
        Assert.Contains("\"head_ranks\"", config);
        using var fresh = new TinyModel();
        using var loaded = (HeadLoraAdapter)new HeadLoraMethod().Load(fresh, temp.Path);
        Assert.Null(loaded.Allocator);
        foreach (var (path, r) in ranks) Assert.Equal(r, loaded.EffectiveHeadRanks()[path]);
        Assert.Equal(ranks.Values.Sum(r => r.Sum()) * (8 + 2 + 1), loaded.ParameterGroups(0, 0).SelectMany(g => g.Parameters).Sum(p => p.numel()));
        fresh.eval();
        Assert.True(fresh.Forward(xs[0]).allclose(trained, 1e-5, 1e-6), "the pruned adapter reproduces the trained model");

        // The export keeps only the surviving components and gives the same logits through plain LoRA.
        using var exported = new TempDir();
        adapter.SavePeftLora(exported.Path);
        using var plain = new TinyModel();
        using var lora = new LoRAHub.Plugins.LoRA.LoraMethod().Load(plain, exported.Path);
        plain.eval();
        Assert.True(plain.Forward(xs[0]).allclose(trained, 1e-5, 1e-5));
    }
}
