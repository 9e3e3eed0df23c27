using LoRAHub.Plugins.GaLore;
using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.Plugins.Tests;

public class GaLoreTests
{
    private static readonly Device Dev = new(Environment.GetEnvironmentVariable("LORAHUB_TEST_DEVICE") ?? "cpu");

    [Fact]
    public void With_identity_projector_and_full_rank_updates_equal_AdamW()
    {
        using var scope = torch.NewDisposeScope();
        torchx.manual_seed(1);
        var a = torch.randn([6, 4], device: Dev).requires_grad_();
        var b = a.detach().clone().requires_grad_();
        var options = new GaLoreOptions { rank = 4, scale = 1.0, update_proj_gap = 1000 };
        using var galore = new GaLoreAdamW([new ParamGroup([a], 1e-2, 0.1)], [a], options);
        using var adamw = new AdamW([b], lr: 1e-2, weight_decay: 0.1, fused: false);
        galore.FreezeProjectors = true;
        galore.ProjectorOf(a)!.Matrix.copy_(torch.eye(4, device: Dev)); // right side (6 ≥ 4): P is 4×4
        for (var step = 0; step < 5; step++)
        {
            var target = torch.randn([6, 4], device: Dev);
            (a - target).pow(2).sum().backward();
            (b - target).pow(2).sum().backward();
            galore.step(); galore.zero_grad();
            adamw.step(); adamw.zero_grad();
            Assert.True(a.allclose(b, 1e-5, 1e-6), $"step {step}: GaLore and AdamW diverge");
        }
    }

    [Fact]
    public void The_projector_is_recomputed_exactly_every_T_steps()
    {
        using var scope = torch.NewDisposeScope();
        torchx.manual_seed(2);
        var w = torch.randn([5, 8], device: Dev).requires_grad_();
        using var opt = new GaLoreAdamW([new ParamGroup([w], 1e-3)], [w], new GaLoreOptions { rank = 2, update_proj_gap = 3 });
        var projector = opt.ProjectorOf(w)!;
        Assert.False(projector.Right); // 5 < 8: left projection, P is 5×2
        Assert.Equal(new long[] { 5, 2 }, projector.Matrix.shape);
        var changedAt = new List<int>();
        var previous = projector.Matrix.clone();
        for (var step = 0; step < 8; step++)
        {
            w.grad = torch.randn([5, 8], device: Dev);
            opt.step();
            if (!projector.Matrix.Equals(previous)) changedAt.Add(step);
            previous = projector.Matrix.clone();
        }
        Assert.Equal(new[] { 0, 3, 6 }, changedAt);
        // The projector spans the top singular vectors: orthonormal columns.
        Assert.True(projector.Matrix.t().matmul(projector.Matrix).allclose(torch.eye(2, device: Dev), 1e-4, 1e-5));
    }

    [Fact]
    public void Loss_falls_and_state_is_smaller_than_AdamW()
    {
        using var model = new TinyBlockModel(16, seed: 3, device: Dev);
        var method = new GaLoreMethod();
        using var adapter = method.Attach(model, new { rank = 4, update_proj_gap = 10, scale = 0.25 });
        var groups = adapter.ParameterGroups(3e-3, 0);
        using var opt = (GaLoreAdamW)adapter.CreateOptimizer(groups, new OptimizerSettings(3e-3, 0))!;
        torchx.manual_seed(4);
        using var x = torch.randn([64, 16], device: Dev);
        using var y = x.sum(1, keepdim: true).sin();
        double Loss()
        {
            using var s = torch.NewDisposeScope();
            using var _ = torch.no_grad();
            return torch.nn.functional.mse_loss(model.forward(x), y).ToDouble();
        }
        var before = Loss();
        for (var i = 0; i < 60; i++)
        {
            using var s = torch.NewDisposeScope();
            torch.nn.functional.mse_loss(model.forward(x), y).backward();
            opt.step();
            opt.zero_grad();
        }
        Assert.True(Loss() < before * 0.5, $"loss {before} → {Loss()}");
        var adamBytes = model.parameters().Sum(p => p.numel()) * 8;
        Assert.True(opt.StateBytes < adamBytes * 0.8, $"GaLore state {opt.StateBytes} B vs AdamW {adamBytes} B");
    }

    [Fact]
    public void Checkpointed_state_restores_steps_and_projectors()
    {
        using var scope = torch.NewDisposeScope();
        torchx.manual_seed(5);
        var w = torch.randn([6, 3], device: Dev).requires_grad_();
        var options = new GaLoreOptions { rank = 2, update_proj_gap = 4 };
        using var first = new GaLoreAdamW([new ParamGroup([w], 1e-2)], [w], options);
        var keys = first.state_tensors().Keys.ToList();
        for (var i = 0; i < 3; i++) { w.grad = torch.randn([6, 3], device: Dev); first.step(); }
        Assert.Equal(keys, first.state_tensors().Keys.ToList());
        var saved = first.state_tensors().ToDictionary(kv => kv.Key, kv => kv.Value.clone());

        var w2 = w.detach().clone().requires_grad_();
        using var second = new GaLoreAdamW([new ParamGroup([w2], 1e-2)], [w2], options);
        second.load_state_tensors(saved);
        var g = torch.randn([6, 3], device: Dev);
        w.grad = g; w2.grad = g.clone();
        first.step(); second.step();   // step 3: no refresh yet; identical
        Assert.True(w.Equals(w2));
        Assert.True(first.ProjectorOf(w)!.Matrix.Equals(second.ProjectorOf(w2)!.Matrix));
    }

    [Fact]
    public void Bad_options_and_unmatched_targets_are_reported()
    {
        using var model = new TinyBlockModel();
        var method = new GaLoreMethod();
        Assert.Contains("rank", Assert.Throws<AdapterConfigurationException>(() => method.Attach(model, new { rank = 0 })).Message);
        var e = Assert.Throws<AdapterConfigurationException>(() => method.Attach(model, new { target_modules = new[] { "q_proj" } }));
        Assert.Contains("attn0", e.Message);
        Assert.Contains("unknown option 'rnk'", Assert.Throws<AdapterConfigurationException>(() => method.Attach(model, new { rnk = 3 })).Message);
    }
}
