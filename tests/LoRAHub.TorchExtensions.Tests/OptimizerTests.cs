using LoRAHub.TorchExtensions.Cuda;
using LoRAHub.TorchExtensions.Optim;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// AdamW, SGD, the schedules and clip_grad_norm_: by hand on every device, and where CUDA is available the multi-tensor
/// kernels against the composite path.
/// </summary>
[Collection(KernelTestsCollection.Name)]
public class OptimizerTests
{
    private static readonly Device Dev = TestDevice.Current;
    private static readonly Device Cuda = new(DeviceType.CUDA, 0);

    [Fact]
    public void AdamW_matches_hand_computed_steps()
    {
        // One parameter, gradient 2p (loss p²), lr 0.1, wd 0.1: PyTorch's AdamW update by hand.
        using var scope = NewDisposeScope();
        var p = tensor(new[] { 1.0f }, device: Dev, requires_grad: true);
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
            Assert.Equal(value, p.cpu().item<float>(), 5);
        }
        Assert.Equal(3f, opt.state_tensors()["0.0.step"].cpu().item<float>());
    }

    [Fact]
    public void AdamW_groups_skip_parameters_without_gradients_and_use_their_own_hyperparameters()
    {
        using var scope = NewDisposeScope();
        var a = tensor(new[] { 1.0f, 2.0f }, device: Dev, requires_grad: true);
        var b = tensor(new[] { 3.0f }, device: Dev, requires_grad: true);
        var idle = tensor(new[] { 5.0f }, device: Dev, requires_grad: true);
        using var opt = new AdamW([new ParamGroup([a], lr: 0.1, weight_decay: 0), new ParamGroup([b, idle], lr: 0.01, weight_decay: 0.5, name: "decayed")]);
        (a.sum() + b.sum()).backward();
        opt.step();
        // First step of Adam moves each element by lr·sign(g) (m̂/√v̂ = ±1), after the decoupled decay.
        Assert.Equal(new[] { 0.9f, 1.9f }, a.cpu().data<float>().ToArray().Select(x => MathF.Round(x, 5)));
        Assert.Equal(3.0 * (1 - 0.01 * 0.5) - 0.01, b.cpu().item<float>(), 5);
        Assert.Equal(5f, idle.cpu().item<float>());
        var state = opt.state_tensors();
        Assert.Equal(0f, state["1.1.step"].cpu().item<float>());
        Assert.Equal(1f, state["1.0.step"].cpu().item<float>());
        Assert.Equal("decayed", opt.param_groups[1].Name);
    }

    [Fact]
    public void AdamW_state_round_trips_through_state_tensors()
    {
        using var scope = NewDisposeScope();
        torchx.manual_seed(7);
        var p = randn([4, 3], device: Dev).requires_grad_();
        var q = p.detach().clone().requires_grad_();
        using var first = new AdamW([p], lr: 0.05);
        for (var i = 0; i < 3; i++)
        {
            p.square().sum().backward();
            first.step();
            first.zero_grad();
        }
        var saved = first.state_tensors().ToDictionary(kv => kv.Key, kv => kv.Value.clone());
        using var second = new AdamW([q], lr: 0.05);
        using (no_grad()) q.copy_(p);
        second.load_state_tensors(saved);
        Assert.Equal(3f, second.state_tensors()["0.0.step"].cpu().item<float>());
        p.square().sum().backward();
        q.square().sum().backward();
        first.step();
        second.step();
        Assert.True(Exact.Equal(p, q), "a restored optimizer must continue exactly");
        var bad = new Dictionary<string, Tensor>(saved) { ["0.0.exp_avg"] = zeros(5) };
        Assert.Contains("0.0.exp_avg", Assert.Throws<InvalidOperationException>(() => second.load_state_tensors(bad)).Message);
    }

    [Fact]
    public void SGD_momentum_schedules_and_clipping()
    {
        using var scope = NewDisposeScope();
        var p = tensor(new[] { 1.0f, -2.0f }, device: Dev, requires_grad: true);
        using var opt = new SGD([p], lr: 0.5, momentum: 0.9);
        (p * p).sum().backward();
        var norm = torchx.nn.utils.clip_grad_norm_([p], 1.0);
        Assert.Equal(Math.Sqrt(4 + 16), norm, 4);
        Assert.Equal(1.0, p.grad!.norm().cpu().item<float>(), 4);
        opt.step();
        var after = p.cpu().data<float>().ToArray();
        Assert.Equal(1 - 0.5 * 2 / Math.Sqrt(20), after[0], 5);
        Assert.Equal(-2 + 0.5 * 4 / Math.Sqrt(20), after[1], 5);

        var sched = LRScheduler.LinearWithWarmup(opt, warmup_steps: 2, total_steps: 6);
        var lrs = new List<double> { sched.get_last_lr()[0] };
        for (var i = 0; i < 6; i++)
        {
            sched.step();
            lrs.Add(sched.get_last_lr()[0]);
        }
        Assert.Equal(new[] { 0, 0.25, 0.5, 0.375, 0.25, 0.125, 0 }, lrs.Select(x => Math.Round(x, 6)));
        var cos = LRScheduler.CosineWithWarmup(opt, 0, 4);
        cos.set_step(2);
        Assert.Equal(0.25, cos.get_last_lr()[0], 6);
        var constant = LRScheduler.ConstantWithWarmup(opt, 4);
        constant.set_step(1);
        Assert.Equal(0.125, constant.get_last_lr()[0], 6);
    }

    [Fact]
    public void Clipping_leaves_small_gradients_alone_and_reports_zero_without_gradients()
    {
        using var scope = NewDisposeScope();
        var p = tensor(new[] { 0.1f, 0.2f }, device: Dev, requires_grad: true);
        var none = tensor(new[] { 1.0f }, device: Dev, requires_grad: true);
        Assert.Equal(0.0, torchx.nn.utils.clip_grad_norm_([none], 1.0));
        (p * p).sum().backward();
        var g = p.grad!.clone();
        var norm = torchx.nn.utils.clip_grad_norm_([p, none], 10.0);
        Assert.Equal(Math.Sqrt(0.04 + 0.16), norm, 5);
        Assert.True(Exact.Equal(p.grad!, g));
    }

    [Fact]
    public void Optimizers_refuse_empty_or_frozen_parameters()
    {
        Assert.Throws<ArgumentException>(() => new AdamW(Array.Empty<Tensor>()));
        using var frozen = ones(2);
        Assert.Throws<ArgumentException>(() => new SGD([frozen], lr: 0.1));
    }

    // ---------------------------------------------------------------- multi-tensor kernels (CUDA)

    private static bool RequireKernels()
    {
        if (!cuda.is_available()) return false;
        Assert.True(CudaKernels.Available, $"CUDA is available but LoRAHub's kernels are not: {CudaKernels.UnavailableReason}");
        return true;
    }

    [Fact]
    public void Fused_AdamW_on_cuda_matches_the_portable_path()
    {
        if (!RequireKernels()) return;
        using var scope = NewDisposeScope();
        torchx.manual_seed(3);
        // Several tensors of odd sizes in two groups: one launch covers them all, chunk boundaries included.
        long[][] shapes = [[64, 32], [7], [3, 40000], [1]];
        var a = shapes.Select(s => randn(s, device: Cuda).requires_grad_()).ToList();
        var b = a.Select(t => t.detach().clone().requires_grad_()).ToList();
        ParamGroup[] Groups(List<Tensor> ps) => [new ParamGroup(ps.Take(2), 1e-2, 0.1), new ParamGroup(ps.Skip(2), 3e-3, 0.0)];
        using var fused = new AdamW(Groups(a), fused: true);
        using var portable = new AdamW(Groups(b), fused: false);
        for (var step = 0; step < 5; step++)
        {
            using var inner = NewDisposeScope();
            var targets = shapes.Select(s => randn(s, device: Cuda)).ToList();
            for (var i = 0; i < a.Count; i++)
            {
                (a[i] - targets[i]).pow(2).sum().backward();
                (b[i] - targets[i]).pow(2).sum().backward();
            }
            var before = CudaKernels.LaunchCount;
            fused.step();
            Assert.Equal(before + 1, CudaKernels.LaunchCount); // one launch for every tensor of the device
            fused.zero_grad();
            portable.step();
            portable.zero_grad();
        }
        for (var i = 0; i < a.Count; i++)
        {
            Assert.True(a[i].isfinite().all().item<bool>());
            Assert.True(a[i].allclose(b[i], 1e-4, 1e-5), $"fused and portable AdamW diverge on tensor {i}");
        }
        Assert.Equal(5f, fused.state_tensors()["1.0.step"].cpu().item<float>());
    }

    [Fact]
    public void Fused_AdamW_on_cuda_updates_bf16_parameters_with_bf16_state()
    {
        if (!RequireKernels()) return;
        using var scope = NewDisposeScope();
        torchx.manual_seed(4);
        var a = randn([256, 64], device: Cuda).to(ScalarType.BFloat16).requires_grad_();
        var reference = a.detach().to(ScalarType.Float32).requires_grad_();
        using var fused = new AdamW([a], lr: 1e-2, weight_decay: 0.1, fused: true);
        using var portable = new AdamW([reference], lr: 1e-2, weight_decay: 0.1, fused: false);
        for (var step = 0; step < 3; step++)
        {
            using var inner = NewDisposeScope();
            var target = randn([256, 64], device: Cuda);
            (a.to(ScalarType.Float32) - target).pow(2).sum().backward();
            (reference - target).pow(2).sum().backward();
            fused.step();
            fused.zero_grad();
            portable.step();
            portable.zero_grad();
        }
        Assert.Equal(ScalarType.BFloat16, fused.state_tensors()["0.0.exp_avg"].dtype);
        // bf16 parameters, gradients and moments: within a few bf16 roundings of the fp32 run.
        Assert.True(a.to(ScalarType.Float32).allclose(reference, 2e-2, 2e-2), "bf16 fused AdamW strays from the fp32 reference");
    }

    [Fact]
    public void Fused_clip_grad_norm_on_cuda_matches_the_composite_norm()
    {
        if (!RequireKernels()) return;
        using var scope = NewDisposeScope();
        torchx.manual_seed(5);
        long[][] shapes = [[300, 70], [5], [20000]];
        var ps = shapes.Select(s => randn(s, device: Cuda).requires_grad_()).ToList();
        foreach (var p in ps) (p * p * 3).sum().backward();
        var grads = ps.Select(p => p.grad!.clone()).ToList();
        var expected = Math.Sqrt(grads.Sum(g => g.to(ScalarType.Float64).square().sum().item<double>()));
        var before = CudaKernels.LaunchCount;
        var norm = torchx.nn.utils.clip_grad_norm_(ps, 1.0);
        Assert.Equal(before + 2, CudaKernels.LaunchCount); // sum of squares, then the scale
        Assert.Equal(expected, norm, expected * 1e-5);
        var coef = 1.0 / (expected + 1e-6);
        for (var i = 0; i < ps.Count; i++)
            Assert.True(ps[i].grad!.allclose(grads[i] * coef, 1e-5, 1e-7), $"gradient {i} scaled wrongly");
    }
}
