namespace LoRAHub.Torch.Optim;

/// <summary>
/// AdamW (decoupled weight decay), PyTorch semantics. State is float32 (also for bf16 parameters, which are
/// updated in float32 and rounded once). On CUDA with libtorch 2.x this is the fused multi-tensor kernel.
/// </summary>
public unsafe class AdamW : Optimizer
{
    private readonly Dictionary<Tensor, (Tensor exp_avg, Tensor exp_avg_sq, Tensor step)> state = new(ReferenceEqualityComparer.Instance);

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

    private (Tensor exp_avg, Tensor exp_avg_sq, Tensor step) State(Tensor p)
    {
        if (state.TryGetValue(p, out var s)) return s;
        // The fused kernel wants state in the parameter's dtype; the portable path keeps fp32 state.
        var type = fused && p.is_cuda ? p.dtype : ScalarType.Float32;
        s = (NewMomentState(p, type).DetachFromDisposeScope(),
             NewMomentState(p, type).DetachFromDisposeScope(),
             torch.zeros([], ScalarType.Float32, p.device).DetachFromDisposeScope());
        state[p] = s;
        return s;
    }

    /// <summary>A zero-filled moment buffer (exp_avg or exp_avg_sq) for parameter p; PagedAdamW puts it in unified memory.</summary>
    protected virtual Tensor NewMomentState(Tensor p, ScalarType type) => torch.zeros(p.shape, type, p.device);

    /// <summary>The moment buffers made so far (exp_avg, exp_avg_sq per parameter).</summary>
    protected IEnumerable<Tensor> MomentStates => state.Values.SelectMany(s => new[] { s.exp_avg, s.exp_avg_sq });

    public override void step()
    {
        foreach (var g in param_groups)
        {
            var n = g.Parameters.Count;
            var ps = new IntPtr[n];
            var ms = new IntPtr[n];
            var vs = new IntPtr[n];
            var ss = new IntPtr[n];
            for (var i = 0; i < n; i++)
            {
                var p = g.Parameters[i];
                var (m, v, s) = State(p);
                ps[i] = p.Handle;
                ms[i] = m.Handle;
                vs[i] = v.Handle;
                ss[i] = s.Handle;
            }
            fixed (IntPtr* pp = ps, pm = ms, pv = vs, pstep = ss)
                Native.Check(Native.lh_adamw_step(pp, pm, pv, pstep, n, g.lr, beta1, beta2, eps, g.weight_decay, fused ? 1 : 0));
        }
    }

    public override Dictionary<string, Tensor> state_tensors()
    {
        var result = new Dictionary<string, Tensor>();
        for (var gi = 0; gi < param_groups.Count; gi++)
            for (var i = 0; i < param_groups[gi].Parameters.Count; i++)
            {
                var (m, v, s) = State(param_groups[gi].Parameters[i]);
                result[$"{gi}.{i}.exp_avg"] = m;
                result[$"{gi}.{i}.exp_avg_sq"] = v;
                result[$"{gi}.{i}.step"] = s;
            }
        return result;
    }

    public override void Dispose()
    {
        foreach (var (m, v, s) in state.Values)
        {
            m.Dispose();
            v.Dispose();
            s.Dispose();
        }
        state.Clear();
    }
}
