using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.GaLore;

/// <summary>
/// AdamW whose moments for projected parameters live in GaLore's low-rank space. Decoupled weight decay and bias
/// correction follow torch.optim.AdamW exactly, so with an identity projector and scale 1 the updates are AdamW's.
/// (The reference GaLore applies decay after the update; the two differ by O(lr²·wd).)
/// </summary>
public sealed class GaLoreAdamW : Optimizer
{
    private sealed class State(Tensor expAvg, Tensor expAvgSq, GaLoreProjector? projector) : IDisposable
    {
        public Tensor ExpAvg { get; } = expAvg;
        public Tensor ExpAvgSq { get; } = expAvgSq;
        public GaLoreProjector? Projector { get; } = projector;
        public long Step { get; set; }

        public void Dispose()
        {
            ExpAvg.Dispose();
            ExpAvgSq.Dispose();
            Projector?.Dispose();
        }
    }

    private readonly Dictionary<Tensor, State> states = new(ReferenceEqualityComparer.Instance);
    private readonly HashSet<Tensor> projected;
    private readonly GaLoreOptions options;
    private readonly double beta1, beta2, eps;

    /// <param name="groups">Parameter groups; parameters in <paramref name="projectedParameters"/> get GaLore.</param>
    public GaLoreAdamW(IEnumerable<ParamGroup> groups, IEnumerable<Tensor> projectedParameters, GaLoreOptions options,
        double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8) : base(groups)
    {
        this.options = options;
        this.beta1 = beta1;
        this.beta2 = beta2;
        this.eps = eps;
        projected = new HashSet<Tensor>(projectedParameters, ReferenceEqualityComparer.Instance);
        // State is made up front so checkpoints have the same keys before and after the first step.
        foreach (var p in param_groups.SelectMany(g => g.Parameters)) states[p] = NewState(p);
    }

    private State NewState(Tensor p)
    {
        if (projected.Contains(p) && p.dim() == 2)
        {
            var projector = new GaLoreProjector(p.size(0), p.size(1), options.rank, options.proj_type, options.scale, p.device);
            return new State(torch.zeros(projector.ProjectedShape, ScalarType.Float32, p.device).DetachFromDisposeScope(),
                torch.zeros(projector.ProjectedShape, ScalarType.Float32, p.device).DetachFromDisposeScope(), projector);
        }
        // Unprojected parameters keep AdamW's state in their own dtype, as torch.optim.AdamW does (bf16 for bf16 weights).
        return new State(torch.zeros(p.shape, p.dtype, p.device).DetachFromDisposeScope(),
            torch.zeros(p.shape, p.dtype, p.device).DetachFromDisposeScope(), null);
    }

    /// <summary>The projector of a parameter (null when it trains with plain AdamW).</summary>
    public GaLoreProjector? ProjectorOf(Tensor parameter) => states[parameter].Projector;

    /// <summary>Test hook: keeps the projector fixed (no SVD refresh) when true.</summary>
    public bool FreezeProjectors { get; set; }

    /// <summary>Bytes of optimizer state (moments and projectors), to compare with AdamW's 2 × 4 bytes per parameter.</summary>
    public long StateBytes => states.Values.Sum(s =>
        (s.ExpAvg.numel() + s.ExpAvgSq.numel()) * s.ExpAvg.element_size() + (s.Projector?.Matrix.numel() ?? 0) * 4);

    public override void step()
    {
        using var noGrad = torch.no_grad();
        foreach (var group in param_groups)
            foreach (var p in group.Parameters)
            {
                using var scope = torch.NewDisposeScope();
                if (p.grad is not { } grad) continue;
                var s = states[p];
                var g = grad.to(s.ExpAvg.dtype);
                if (s.Projector is { } projector)
                {
                    if (s.Step % options.update_proj_gap == 0 && !FreezeProjectors) projector.Update(g);
                    g = projector.Project(g);
                }
                s.Step++;
                if (group.weight_decay != 0) p.mul_(1 - group.lr * group.weight_decay);
                s.ExpAvg.mul_(beta1).add_(g, 1 - beta1);
                s.ExpAvgSq.mul_(beta2).add_(g.square(), 1 - beta2);
                var bc1 = 1 - Math.Pow(beta1, s.Step);
                var bc2 = 1 - Math.Pow(beta2, s.Step);
                var update = s.ExpAvg / (s.ExpAvgSq.sqrt() / Math.Sqrt(bc2) + eps);
                if (s.Projector is { } back) update = back.ProjectBack(update);
                p.add_(update.to(p.dtype), -group.lr / bc1);
            }
    }

    public override Dictionary<string, Tensor> state_tensors()
    {
        var result = new Dictionary<string, Tensor>();
        for (var gi = 0; gi < param_groups.Count; gi++)
            for (var i = 0; i < param_groups[gi].Parameters.Count; i++)
            {
                var s = states[param_groups[gi].Parameters[i]];
                result[$"{gi}.{i}.exp_avg"] = s.ExpAvg;
                result[$"{gi}.{i}.exp_avg_sq"] = s.ExpAvgSq;
                if (s.Projector != null) result[$"{gi}.{i}.projector"] = s.Projector.Matrix;
                stepTensors[(gi, i)] = result[$"{gi}.{i}.step"] = ReplaceStepTensor(stepTensors.GetValueOrDefault((gi, i)), s.Step, param_groups[gi].Parameters[i].device);
            }
        return result;
    }

    private readonly Dictionary<(int, int), Tensor> stepTensors = new();

    private static Tensor ReplaceStepTensor(Tensor? old, long step, Device device)
    {
        old?.Dispose();
        return torch.tensor((float)step, device: device).DetachFromDisposeScope();
    }

    protected override void OnStateLoaded()
    {
        foreach (var ((gi, i), t) in stepTensors)
            states[param_groups[gi].Parameters[i]].Step = (long)t.item<float>();
    }

    public override void Dispose()
    {
        foreach (var s in states.Values) s.Dispose();
        foreach (var t in stepTensors.Values) t.Dispose();
        states.Clear();
        stepTensors.Clear();
    }
}
