using LoRAHub.Torch.NN;
using LoRAHub.Torch.Optim;

namespace LoRAHub.Torch.Tests;

public class ModuleAndOptimizerTests
{
    private sealed class Block : Module
    {
        public Block() : base("Block")
        {
            register_module("proj", new Linear(3, 2));
            register_module("norm", new RMSNorm(2));
            register_buffer("scale", torch.ones(2), persistent: false);
        }

        public override Tensor forward(Tensor x) => Child<Module>("norm").forward(Child<Module>("proj").forward(x));
    }

    [Fact]
    public void Named_parameters_state_dict_and_replacement()
    {
        using var m = new Block();
        Assert.Equal(new[] { "proj.weight", "proj.bias", "norm.weight" }, m.named_parameters().Select(p => p.name));
        Assert.Equal(new[] { "proj.weight", "proj.bias", "norm.weight" }, m.state_dict().Keys); // non-persistent buffer excluded
        Assert.Equal(new[] { "", "proj", "norm" }, m.named_modules().Select(x => x.name));
        var old = m.replace_submodule("proj", new Linear(3, 2, hasBias: false));
        Assert.IsType<Linear>(old);
        Assert.Equal(new[] { "proj.weight", "norm.weight" }, m.named_parameters().Select(p => p.name));
        old.Dispose();
    }

    [Fact]
    public void Load_state_dict_copies_and_reports_shape_mismatch_by_key()
    {
        using var a = new Block();
        using var b = new Block();
        b.load_state_dict(a.state_dict());
        using var scope = torch.NewDisposeScope();
        var x = torch.randn(4, 3);
        Assert.True(a.forward(x).equal(b.forward(x)));
        var bad = new Dictionary<string, Tensor>(a.state_dict()) { ["proj.weight"] = torch.zeros(5, 3) };
        var e = Assert.Throws<InvalidOperationException>(() => b.load_state_dict(bad));
        Assert.Contains("proj.weight", e.Message);
        Assert.Contains("[5, 3]", e.Message);
        Assert.Contains("[2, 3]", e.Message);
        var missing = new Dictionary<string, Tensor>(a.state_dict());
        missing.Remove("norm.weight");
        Assert.Contains("norm.weight", Assert.Throws<InvalidOperationException>(() => b.load_state_dict(missing)).Message);
    }

    [Fact]
    public void Module_to_converts_in_place_keeping_identity()
    {
        using var m = new Block();
        var w = m.named_parameters().First().parameter;
        m.to(ScalarType.BFloat16);
        Assert.Same(w, m.named_parameters().First().parameter);
        Assert.Equal(ScalarType.BFloat16, w.dtype);
        Assert.True(w.requires_grad);
    }

    [Fact]
    public void AdamW_matches_hand_computed_steps()
    {
        // One parameter, gradient 2p (loss p²), lr 0.1, wd 0.1: PyTorch's AdamW update by hand.
        using var scope = torch.NewDisposeScope();
        var p = torch.tensor(new[] { 1.0f }, requires_grad: true);
        using var opt = new AdamW([p], lr: 0.1, weight_decay: 0.1);
        double value = 1.0, m = 0, v = 0;
        for (var step = 1; step <= 3; step++)
        {
            (p * p).sum().backward();
            opt.step();
            opt.zero_grad();
            var g = 2 * value;
            value *= 1 - 0.1 * 0.1;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            var mHat = m / (1 - Math.Pow(0.9, step));
            var vHat = v / (1 - Math.Pow(0.999, step));
            value -= 0.1 * mHat / (Math.Sqrt(vHat) + 1e-8);
            Assert.Equal(value, p.item<float>(), 5);
        }
        Assert.Equal(3f, opt.state_tensors()["0.0.step"].item<float>());
    }

    [Fact]
    public void Fused_AdamW_on_cuda_matches_the_portable_path()
    {
        if (!TestDevice.IsCuda) return; // the fused kernel exists only on CUDA (run with LORAHUB_TEST_DEVICE=cuda)
        using var scope = torch.NewDisposeScope();
        torch.manual_seed(3);
        var a = torch.randn([64, 32], device: TestDevice.Current).requires_grad_();
        var b = a.detach().clone().requires_grad_();
        using var fused = new AdamW([a], lr: 1e-2, weight_decay: 0.1, fused: true);
        using var portable = new AdamW([b], lr: 1e-2, weight_decay: 0.1, fused: false);
        for (var step = 0; step < 5; step++)
        {
            var target = torch.randn([64, 32], device: TestDevice.Current);
            (a - target).pow(2).sum().backward();
            (b - target).pow(2).sum().backward();
            fused.step(); fused.zero_grad();
            portable.step(); portable.zero_grad();
        }
        Assert.True(a.isfinite().all().item<bool>());
        Assert.True(a.allclose(b, 1e-4, 1e-5), "fused and portable AdamW diverge");
        Assert.Equal(5f, fused.state_tensors()["0.0.step"].item<float>());
    }

    [Fact]
    public void SGD_momentum_schedules_and_clipping()
    {
        using var scope = torch.NewDisposeScope();
        var p = torch.tensor(new[] { 1.0f, -2.0f }, requires_grad: true);
        using var opt = new SGD([p], lr: 0.5, momentum: 0.9);
        (p * p).sum().backward();
        var norm = torch.nn.utils.clip_grad_norm_([p], 1.0);
        Assert.Equal(Math.Sqrt(4 + 16), norm, 4);
        Assert.Equal(1.0, p.grad!.norm().item<float>(), 4);
        opt.step();
        var after = p.data<float>();
        Assert.Equal(1 - 0.5 * 2 / Math.Sqrt(20), after[0], 5);
        Assert.Equal(-2 + 0.5 * 4 / Math.Sqrt(20), after[1], 5);

        var sched = LRScheduler.LinearWithWarmup(opt, warmup_steps: 2, total_steps: 6);
        var lrs = new List<double> { sched.get_last_lr()[0] };
        for (var i = 0; i < 6; i++) { sched.step(); lrs.Add(sched.get_last_lr()[0]); }
        Assert.Equal(new[] { 0, 0.25, 0.5, 0.375, 0.25, 0.125, 0 }, lrs.Select(x => Math.Round(x, 6)));
        var cos = LRScheduler.CosineWithWarmup(opt, 0, 4);
        cos.set_step(2);
        Assert.Equal(0.25, cos.get_last_lr()[0], 6);
    }
}
