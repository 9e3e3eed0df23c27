using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.AdaLoRA.Tests;

public sealed class AdaLoraTests
{
    private static readonly string[] Targets = ["q_proj", "v_proj", "o_proj"];

    private static AdaLoraAdapter Attach(TinyModel model, int totalStep = 30, int tinit = 5, int tfinal = 5, double orth = 0.5) =>
        (AdaLoraAdapter)new AdaLoraMethod().Attach(model, new AdaLoraOptions
        {
            InitR = 6, TargetR = 2, TotalStep = totalStep, Tinit = tinit, Tfinal = tfinal, LoraAlpha = 8, OrthRegWeight = orth,
            TargetModules = Targets.ToList(),
        });

    [Fact]
    public void Budget_falls_cubically_from_init_to_target()
    {
        using var model = new TinyModel();
        using var adapter = (AdaLoraAdapter)new AdaLoraMethod().Attach(model, new AdaLoraOptions
        {
            InitR = 12, TargetR = 8, TotalStep = 15, Tinit = 2, Tfinal = 3, DeltaT = 2, TargetModules = Targets.ToList(),
        });
        var allocator = adapter.Allocator;
        Assert.Equal(72, allocator.InitialBudget);  // 6 layers × 12
        Assert.Equal(48, allocator.TargetBudget);   // 6 layers × 8
        Assert.Equal((72, false), allocator.BudgetSchedule(2));
        // step 7: 1 − (7 − 2)/(15 − 3 − 2) = 0.5 → 24·0.125 + 48 = 51; 7 % deltaT ≠ 0 → no masking this step
        Assert.Equal((51, false), allocator.BudgetSchedule(7));
        Assert.Equal((60, true), allocator.BudgetSchedule(4)); // 0.8 → 24·0.512 + 48 = 60.3, and 4 % deltaT = 0
        Assert.Equal((48, true), allocator.BudgetSchedule(13)); // the final phase: target, masked every step
    }

    [Fact]
    public void Starts_as_the_base_model_and_merges_exactly()
    {
        using var scope = torch.NewDisposeScope();
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var baseline = model.Forward(x);
        using var adapter = Attach(model);
        Assert.True(model.Forward(x).Equals(baseline), "E = 0 at init: the base output exactly");
        using (torch.no_grad())
            foreach (var (_, l) in adapter.Layers) l.E.normal_(0, 1);
        var adapted = model.Forward(x);
        Assert.False(adapted.allclose(baseline, 1e-3, 1e-3));
        adapter.Merge();
        Assert.True(model.Forward(x).allclose(adapted, 1e-5, 1e-6), "merged equals unmerged");
        adapter.Unmerge();
        adapter.Enabled = false;
        Assert.True(model.Forward(x).allclose(baseline, 1e-5, 1e-6), "disabled and unmerged: the base again");
    }

    [Fact]
    public void Merge_and_unload_leaves_plain_linears_with_the_adapted_output()
    {
        using var scope = torch.NewDisposeScope();
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var adapter = Attach(model);
        using (torch.no_grad())
            foreach (var (_, l) in adapter.Layers) l.E.normal_(0, 1);
        var adapted = model.Forward(x);
        adapter.MergeAndUnload();
        Assert.IsType<TorchSharp.Modules.Linear>(model.get_submodule("model.layers.0.self_attn.q_proj"));
        Assert.DoesNotContain(model.state_dict().Keys, k => k.Contains("lora_") || k.Contains("base_layer"));
        Assert.True(model.Forward(x).allclose(adapted, 1e-5, 1e-6));
        adapter.Dispose();
    }

    [Fact]
    public void Orthogonality_regulariser_has_known_values()
    {
        using var scope = torch.NewDisposeScope();
        using var model = new TinyModel();
        using var adapter = Attach(model, orth: 1.0);
        model.train();
        using (torch.no_grad())
            foreach (var (_, l) in adapter.Layers)
            {
                l.A.copy_(torch.eye(6, 8).mul(2));
                l.B.copy_(torch.eye(8, 6));
            }
        // A = [2I 0]: AAᵀ − I = 3I → ‖·‖_F = 3√6; B = [I; 0]: BᵀB − I = 0. Mean over the 12 matrices of 6 layers.
        var expected = 6 * 3 * Math.Sqrt(6) / 12;
        Assert.Equal(expected, adapter.AuxiliaryLoss()!.item<float>(), 4);
    }

    [Fact]
    public void Training_reallocates_to_the_target_budget_and_saves_the_pruned_adapter()
    {
        using var scope = torch.NewDisposeScope();
        var dir = Path.Combine(Path.GetTempPath(), "lorahub-adalora-" + Guid.NewGuid().ToString("N"));
        using var model = new TinyModel();
        var x = TinyModel.Batch();
        var y = TinyModel.Batch(seed: 2);
        using var adapter = Attach(model);
        model.train();
        using var optimizer = new AdamW(adapter.ParameterGroups(2e-2, 0.0));
        var losses = new List<float>();
        for (var step = 0; step < 30; step++)
        {
            using var stepScope = torch.NewDisposeScope();
            var loss = model.Loss(x, y) + adapter.AuxiliaryLoss()!;
            loss.backward();
            adapter.OnAfterBackward(step);
            optimizer.step();
            optimizer.zero_grad();
            adapter.OnStepEnd(step);
            losses.Add(loss.item<float>());
        }
        Assert.True(losses[^1] < losses[0] * 0.8, $"loss {losses[0]} → {losses[^1]}");
        var ranks = adapter.EffectiveRanks();
        Assert.Equal(2 * adapter.Layers.Count, ranks.Values.Sum());
        foreach (var (path, l) in adapter.Layers)
            Assert.Equal(ranks[path], (int)l.E.ne(0).sum().item<long>());
        Assert.Contains(ranks.Values, r => r != 2); // the budget moved between layers (not a uniform r = 2)

        model.eval();
        var trained = model.Forward(x);
        try
        {
            adapter.Save(dir);
            var config = File.ReadAllText(Path.Combine(dir, "adapter_config.json"));
            Assert.Contains("\"peft_type\": \"ADALORA\"", config);
            Assert.Contains("\"rank_pattern\"", config);
            var saved = torchx.load_safetensors(Path.Combine(dir, "adapter_model.safetensors"));
            var (firstPath, _) = adapter.Layers.First();
            Assert.Equal([(long)ranks[firstPath], 1L], saved[$"base_model.model.{firstPath}.lora_E"].shape);

            using var fresh = new TinyModel();
            using var loaded = (AdaLoraAdapter)new AdaLoraMethod().Load(fresh, dir);
            fresh.eval();
            Assert.True(fresh.Forward(x).allclose(trained, 1e-5, 1e-6), "the pruned adapter reproduces the trained model");
            Assert.Equal(6, loaded.Layers.Values.First().RankNum); // PEFT keeps the training scale: ranknum stays init_r
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void Masking_keeps_the_highest_scoring_triplets()
    {
        using var scope = torch.NewDisposeScope();
        using var model = new TinyModel();
        using var adapter = Attach(model);
        model.train();
        using (torch.no_grad())
            foreach (var (_, l) in adapter.Layers) l.E.normal_(0, 1);
        for (var step = 0; step < 3; step++)
        {
            using var s = torch.NewDisposeScope();
            model.Loss(TinyModel.Batch(seed: step), TinyModel.Batch(seed: step + 10)).backward();
            adapter.Allocator.UpdateImportance();
            foreach (var p in adapter.ParameterGroups(0, 0).SelectMany(g => g.Parameters)) p.grad?.zero_();
        }
        var scores = adapter.Allocator.TripletScores().Select(t => t.data<float>().ToArray()).ToArray();
        var keep = adapter.Allocator.MaskToBudget(20);
        Assert.Equal(20, keep.Sum(k => k.Count(b => b)));
        var kept = scores.SelectMany((s, i) => s.Where((_, j) => keep[i][j])).Min();
        var dropped = scores.SelectMany((s, i) => s.Where((_, j) => !keep[i][j])).Max();
        Assert.True(kept > dropped, $"a kept triplet scores {kept}, a masked one {dropped}");
    }

    [Fact]
    public void Bad_options_and_folders_are_reported()
    {
        using var model = new TinyModel();
        var e = Assert.Throws<AdapterConfigurationException>(() => new AdaLoraMethod().Attach(model, new { target_modules = Targets }));
        Assert.Contains("total_step", e.Message);
        e = Assert.Throws<AdapterConfigurationException>(() => new AdaLoraMethod().Attach(model, new { total_step = 10, target_modules = new[] { "nope" } }));
        Assert.Contains("q_proj", e.Message); // lists the Linear layers there are
        var dir = Directory.CreateTempSubdirectory().FullName;
        File.WriteAllText(Path.Combine(dir, "adapter_config.json"), "{\"peft_type\": \"LORA\"}");
        var wrong = Assert.Throws<InvalidDataException>(() => new AdaLoraMethod().Load(model, dir));
        Assert.Contains("\"lora\"", wrong.Message);
        Directory.Delete(dir, true);
    }
}
