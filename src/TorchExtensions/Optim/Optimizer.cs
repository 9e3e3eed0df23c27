using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Optim;

/// <summary>A set of parameters sharing hyper-parameters (PyTorch's param_groups entry).</summary>
public sealed class ParamGroup
{
    public ParamGroup(IEnumerable<Tensor> parameters, double lr, double weight_decay = 0.0, string name = "")
    {
        Parameters = parameters.ToList();
        this.lr = lr;
        initial_lr = lr;
        this.weight_decay = weight_decay;
        Name = name;
    }

    public List<Tensor> Parameters { get; }
    public double lr { get; set; }
    /// <summary>The learning rate schedulers scale from.</summary>
    public double initial_lr { get; set; }
    public double weight_decay { get; set; }
    public string Name { get; }
}

/// <summary>
/// Base of LoRAHub's optimizers: parameter groups, zero_grad, and per-parameter state tensors for checkpoints. (Not
/// TorchSharp's torch.optim.Optimizer: its ParamGroup and step(closure) contract differ from ours, which the trainer,
/// the plugins' optimizers and checkpoints are written against.)
/// </summary>
public abstract class Optimizer : IDisposable
{
    protected Optimizer(IEnumerable<ParamGroup> groups)
    {
        param_groups = groups.ToList();
        if (param_groups.Count == 0 || param_groups.All(g => g.Parameters.Count == 0))
            throw new ArgumentException("the optimizer got no parameters; did the method mark any as trainable?");
        foreach (var p in param_groups.SelectMany(g => g.Parameters))
            if (!p.requires_grad) throw new ArgumentException($"optimizer parameter of shape [{string.Join(", ", p.shape)}] does not require grad");
    }

    public List<ParamGroup> param_groups { get; }

    public abstract void step();

    /// <summary>Clears gradients; set_to_none frees them (PyTorch's default).</summary>
    public void zero_grad(bool set_to_none = true)
    {
        foreach (var p in param_groups.SelectMany(g => g.Parameters))
        {
            if (set_to_none)
            {
                p.grad = null;
                continue;
            }
            using var g = p.grad;
            g?.zero_();
        }
    }

    /// <summary>
    /// Optimizer state tensors by "group.index.name" (for checkpoints). They belong to the optimizer: do not dispose them;
    /// copies (e.g. of state that is not a tensor) are replaced by the next call.
    /// </summary>
    public abstract Dictionary<string, Tensor> state_tensors();

    /// <summary>Restores state saved by <see cref="state_tensors"/> (values are copied).</summary>
    public void load_state_tensors(IReadOnlyDictionary<string, Tensor> saved)
    {
        using var _ = no_grad();
        foreach (var (key, target) in state_tensors())
        {
            if (!saved.TryGetValue(key, out var value))
                throw new InvalidOperationException($"optimizer state '{key}' is missing from the checkpoint; was it saved with the same trainable parameters?");
            if (!value.shape.SequenceEqual(target.shape))
                throw new InvalidOperationException(
                    $"optimizer state '{key}' has shape [{string.Join(", ", value.shape)}] in the checkpoint but [{string.Join(", ", target.shape)}] here");
            target.copy_(value);
        }
        OnStateLoaded();
    }

    /// <summary>Lets an optimizer refresh what it keeps outside its state tensors (step counters, paged memory).</summary>
    protected virtual void OnStateLoaded() { }

    public abstract void Dispose();
}
