namespace LoRAHub.Torch.Optim;

/// <summary>Stochastic gradient descent with optional momentum and weight decay (PyTorch semantics).</summary>
public sealed unsafe class SGD : Optimizer
{
    private readonly Dictionary<Tensor, Tensor> momentumBuffers = new(ReferenceEqualityComparer.Instance);

    public SGD(IEnumerable<Tensor> parameters, double lr, double momentum = 0.0, double weight_decay = 0.0)
        : base([new ParamGroup(parameters, lr, weight_decay)]) => this.momentum = momentum;

    public double momentum { get; }

    private Tensor Buffer(Tensor p)
    {
        if (!momentumBuffers.TryGetValue(p, out var b))
            momentumBuffers[p] = b = torch.zeros(p.shape, p.dtype, p.device).DetachFromDisposeScope();
        return b;
    }

    public override void step()
    {
        foreach (var g in param_groups)
        {
            var ps = g.Parameters.Select(p => p.Handle).ToArray();
            var bs = g.Parameters.Select(p => Buffer(p).Handle).ToArray();
            fixed (IntPtr* pp = ps, pb = bs)
                Native.Check(Native.lh_sgd_step(pp, pb, ps.Length, g.lr, momentum, g.weight_decay));
        }
    }

    public override Dictionary<string, Tensor> state_tensors()
    {
        var result = new Dictionary<string, Tensor>();
        for (var gi = 0; gi < param_groups.Count; gi++)
            for (var i = 0; i < param_groups[gi].Parameters.Count; i++)
                result[$"{gi}.{i}.momentum_buffer"] = Buffer(param_groups[gi].Parameters[i]);
        return result;
    }

    public override void Dispose()
    {
        foreach (var b in momentumBuffers.Values) b.Dispose();
        momentumBuffers.Clear();
    }
}
