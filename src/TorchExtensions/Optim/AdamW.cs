using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Optim;

/// <summary>
/// AdamW (decoupled weight decay), PyTorch semantics. On CUDA with <see cref="fused"/> one multi-tensor kernel updates
/// every trainable tensor of a device per step (state in the parameter's dtype, as torch.optim.AdamW(fused=True)).
/// Elsewhere (CPU, fused off, LoRAHub's kernels unavailable) per-tensor TorchSharp ops with fp32 state (bf16 parameters are
/// updated in fp32 and rounded once). Step counts live on the host; checkpoints see them as "step" tensors.
/// </summary>
public class AdamW : Optimizer
{
    private readonly Dictionary<Tensor, State> state = new(ReferenceEqualityComparer.Instance);
    private readonly List<Tensor> stepTensors = new();
    private readonly List<(Tensor snapshot, ManagedBuffer target)> snapshots = new();

    public AdamW(IEnumerable<Tensor> parameters, double lr = 1e-3, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8,
        double weight_decay = 0.01, bool fused = true)
        : this([new ParamGroup(parameters, lr, weight_decay)], beta1, beta2, eps, fused)
    {
    }

    public AdamW(IEnumerable<ParamGroup> groups, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8, bool fused = true) : base(groups)
    {
        this.beta1 = beta1;
        this.beta2 = beta2;
        this.eps = eps;
        this.fused = fused;
    }

    public double beta1 { get; }
    public double beta2 { get; }
    public double eps { get; }
    public bool fused { get; }

    /// <summary>A moment buffer: a tensor, or (paged optimizers) CUDA managed memory.</summary>
    private protected sealed class Moment(Tensor? tensor, ManagedBuffer? managed) : IDisposable
    {
        public Tensor? Tensor { get; } = tensor;
        public ManagedBuffer? Managed { get; } = managed;
        public ScalarType DType => Tensor?.dtype ?? Managed!.dtype;
        public IntPtr Pointer => Tensor is { } t ? KernelTensors.Ptr(t) : Managed!.Pointer;

        public void Dispose()
        {
            Tensor?.Dispose();
            Managed?.Dispose();
        }
    }

    private sealed class State(Moment expAvg, Moment expAvgSq)
    {
        public Moment ExpAvg { get; } = expAvg;
        public Moment ExpAvgSq { get; } = expAvgSq;
        public long Step { get; set; }
    }

    // The kernel keeps state in the parameter's dtype (what the fused path needs); the composite path keeps fp32 state.
    private ScalarType StateType(Tensor p) => fused && p.device_type == DeviceType.CUDA && KernelTensors.Supported(p.dtype) ? p.dtype : ScalarType.Float32;

    /// <summary>True when parameter p takes the multi-tensor kernel (fused, CUDA, a kernel dtype, contiguous).</summary>
    private protected bool KernelApplies(Tensor p) => fused && KernelTensors.Usable(p) && p.is_contiguous();

    private State StateOf(Tensor p)
    {
        if (state.TryGetValue(p, out var s)) return s;
        var type = StateType(p);
        s = new State(NewMomentState(p, type), NewMomentState(p, type));
        state[p] = s;
        return s;
    }

    /// <summary>A zero-filled moment buffer (exp_avg or exp_avg_sq) for parameter p; PagedAdamW puts large ones in unified memory.</summary>
    private protected virtual Moment NewMomentState(Tensor p, ScalarType type) =>
        new(zeros(p.shape, type, p.device).DetachFromDisposeScope(), null);

    public override void step()
    {
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        // Compile the kernels before any state is made or changed: if that fails, this step already runs composite.
        foreach (var device in param_groups.SelectMany(g => g.Parameters).Where(KernelApplies).Select(KernelTensors.DeviceIndex).Distinct().ToList())
            MultiTensorKernels.TryPrepare(device);
        var launches = new Dictionary<int, List<MultiTensorKernels.Item>>();
        foreach (var g in param_groups)
            foreach (var p in g.Parameters)
            {
                var grad = p.grad;
                if (grad is null) continue;
                var s = StateOf(p);
                s.Step++;
                var bc1 = 1 - Math.Pow(beta1, s.Step);
                var bc2 = 1 - Math.Pow(beta2, s.Step);
                if (s.ExpAvg.Managed is not null || KernelApplies(p) && KernelTensors.Supported(grad.dtype) &&
                    s.ExpAvg.Tensor!.is_contiguous() && s.ExpAvgSq.Tensor!.is_contiguous())
                {
                    if (!grad.is_contiguous()) grad = grad.contiguous();
                    var device = KernelTensors.DeviceIndex(p);
                    if (!launches.TryGetValue(device, out var items)) launches[device] = items = new();
                    items.Add(new MultiTensorKernels.Item(KernelTensors.Ptr(p), KernelTensors.Ptr(grad), s.ExpAvg.Pointer, s.ExpAvgSq.Pointer,
                        p.numel(), p.dtype, grad.dtype, s.ExpAvg.DType, g.lr, g.weight_decay, bc1, Math.Sqrt(bc2)));
                }
                else
                {
                    CompositeStep(p, grad, s.ExpAvg.Tensor!, s.ExpAvgSq.Tensor!, g.lr, g.weight_decay, bc1, bc2);
                }
            }
        // The grad handles of this scope stay valid until the launches are enqueued; the kernels run in stream order.
        foreach (var (device, items) in launches) MultiTensorKernels.AdamW(device, items, beta1, beta2, eps);
    }

    private void CompositeStep(Tensor p, Tensor grad, Tensor m, Tensor v, double lr, double weightDecay, double bc1, double bc2)
    {
        using var scope = NewDisposeScope();
        var g = grad.dtype == m.dtype ? grad : grad.to(m.dtype);
        if (weightDecay != 0) p.mul_(1.0 - lr * weightDecay);
        m.mul_(beta1).add_(g, 1 - beta1);
        v.mul_(beta2).addcmul_(g, g, 1 - beta2);
        var denom = (v.sqrt() / Math.Sqrt(bc2)).add_(eps);
        if (p.dtype == m.dtype)
        {
            p.addcdiv_(m, denom, -lr / bc1);
        }
        else
        {
            // A low-precision parameter with fp32 state: update in fp32, then round once.
            var p32 = p.to(m.dtype);
            p32.addcdiv_(m, denom, -lr / bc1);
            p.copy_(p32);
        }
    }

    /// <summary>The managed-memory moment buffers made so far (PagedAdamW).</summary>
    private protected IEnumerable<ManagedBuffer> ManagedMoments =>
        state.Values.SelectMany(s => new[] { s.ExpAvg.Managed, s.ExpAvgSq.Managed }).Where(b => b is not null).Cast<ManagedBuffer>();

    public override Dictionary<string, Tensor> state_tensors()
    {
        ReleaseCopies();
        var result = new Dictionary<string, Tensor>();
        for (var gi = 0; gi < param_groups.Count; gi++)
            for (var i = 0; i < param_groups[gi].Parameters.Count; i++)
            {
                var p = param_groups[gi].Parameters[i];
                var s = StateOf(p);
                result[$"{gi}.{i}.exp_avg"] = Visible(s.ExpAvg);
                result[$"{gi}.{i}.exp_avg_sq"] = Visible(s.ExpAvgSq);
                var step = full([], s.Step, ScalarType.Float32, p.device).DetachFromDisposeScope();
                stepTensors.Add(step);
                result[$"{gi}.{i}.step"] = step;
            }
        return result;
    }

    // A tensor moment as it is; managed memory as a copy that OnStateLoaded writes back.
    private Tensor Visible(Moment m)
    {
        if (m.Tensor is { } t) return t;
        var copy = m.Managed!.to_tensor().DetachFromDisposeScope();
        snapshots.Add((copy, m.Managed));
        return copy;
    }

    protected override void OnStateLoaded()
    {
        for (var gi = 0; gi < param_groups.Count; gi++)
            for (var i = 0; i < param_groups[gi].Parameters.Count; i++)
            {
                StateOf(param_groups[gi].Parameters[i]).Step = (long)stepTensors[Index(gi, i)].item<float>();
            }
        foreach (var (snapshot, target) in snapshots) target.copy_(snapshot);
    }

    // Position of parameter (gi, i) in the order state_tensors() made the step tensors.
    private int Index(int gi, int i) => param_groups.Take(gi).Sum(g => g.Parameters.Count) + i;

    private void ReleaseCopies()
    {
        foreach (var t in stepTensors) t.Dispose();
        stepTensors.Clear();
        foreach (var (snapshot, _) in snapshots) snapshot.Dispose();
        snapshots.Clear();
    }

    public override void Dispose()
    {
        ReleaseCopies();
        foreach (var s in state.Values)
        {
            s.ExpAvg.Dispose();
            s.ExpAvgSq.Dispose();
        }
        state.Clear();
    }
}
