using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Optim;

/// <summary>Stochastic gradient descent with optional momentum and weight decay (PyTorch semantics: buf = momentum·buf + grad; p −= lr·buf).</summary>
public sealed class SGD : Optimizer
{
    private readonly Dictionary<Tensor, Tensor> momentumBuffers = new(ReferenceEqualityComparer.Instance);

    public SGD(IEnumerable<Tensor> parameters, double lr, double momentum = 0.0, double weight_decay = 0.0)
        : base([new ParamGroup(parameters, lr, weight_decay)]) => this.momentum = momentum;

    public double momentum { get; }

    private Tensor Buffer(Tensor p)
    {
        if (!momentumBuffers.TryGetValue(p, out var b))
            momentumBuffers[p] = b = zeros(p.shape, p.dtype, p.device).DetachFromDisposeScope();
        return b;
    }

    public override void step()
    {
        using var noGrad = no_grad();
        foreach (var g in param_groups)
            foreach (var p in g.Parameters)
            {
                using var scope = NewDisposeScope();
                var grad = p.grad;
                if (grad is null) continue;
                if (g.weight_decay != 0) grad = grad.add(p, g.weight_decay);
                if (momentum != 0)
                {
                    var buf = Buffer(p);
                    buf.mul_(momentum).add_(grad);
                    grad = buf;
                }
                p.add_(grad, -g.lr);
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
