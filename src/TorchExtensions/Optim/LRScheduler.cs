namespace LoRAHub.TorchExtensions.Optim;

/// <summary>
/// Sets each group's lr to initial_lr × factor(step) (PyTorch's LambdaLR). Call <see cref="step"/> after each optimizer step.
/// </summary>
public class LRScheduler
{
    private readonly Func<long, double> factor;

    public LRScheduler(Optimizer optimizer, Func<long, double> factor)
    {
        this.optimizer = optimizer;
        this.factor = factor;
        Apply();
    }

    public Optimizer optimizer { get; }
    public long last_epoch { get; private set; }

    public void step()
    {
        last_epoch++;
        Apply();
    }

    /// <summary>Jumps to a step (for resuming from a checkpoint).</summary>
    public void set_step(long step)
    {
        last_epoch = step;
        Apply();
    }

    public double[] get_last_lr() => optimizer.param_groups.Select(g => g.lr).ToArray();

    private void Apply()
    {
        var f = factor(last_epoch);
        foreach (var g in optimizer.param_groups) g.lr = g.initial_lr * f;
    }

    /// <summary>Linear warm-up from 0, then linear decay to 0 at total_steps (transformers' get_linear_schedule_with_warmup).</summary>
    public static LRScheduler LinearWithWarmup(Optimizer optimizer, long warmup_steps, long total_steps) =>
        new(optimizer, step => step < warmup_steps
            ? (double)step / Math.Max(1, warmup_steps)
            : Math.Max(0.0, (double)(total_steps - step) / Math.Max(1, total_steps - warmup_steps)));

    /// <summary>Linear warm-up, then half a cosine down to min_ratio (transformers' get_cosine_schedule_with_warmup).</summary>
    public static LRScheduler CosineWithWarmup(Optimizer optimizer, long warmup_steps, long total_steps, double min_ratio = 0.0) =>
        new(optimizer, step =>
        {
            if (step < warmup_steps) return (double)step / Math.Max(1, warmup_steps);
            var progress = Math.Min(1.0, (double)(step - warmup_steps) / Math.Max(1, total_steps - warmup_steps));
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + Math.Cos(Math.PI * progress));
        });

    /// <summary>A constant learning rate after a linear warm-up.</summary>
    public static LRScheduler ConstantWithWarmup(Optimizer optimizer, long warmup_steps) =>
        new(optimizer, step => step < warmup_steps ? (double)step / Math.Max(1, warmup_steps) : 1.0);
}
