using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Tuners.Importance;

/// <summary>
/// AdaLoRA's importance statistics (Zhang et al. 2023; PEFT's RankAllocator.update_ipt): for every entry w of a tracked
/// tensor, the sensitivity I = |w·∂L/∂w| smoothed by an EMA Ī (β1) and its uncertainty Ū, an EMA (β2) of |I − Ī|. The
/// score of an entry is s = Ī·Ū. Shared by the methods that spend a rank budget by importance (AdaLoRA, HeadLoRA).
/// </summary>
public sealed class SensitivityEma(double beta1, double beta2) : IDisposable
{
    private readonly Dictionary<Tensor, (Tensor avg, Tensor unc)> state = new(ReferenceEqualityComparer.Instance);

    public double Beta1 { get; } = beta1;

    public double Beta2 { get; } = beta2;

    /// <summary>Folds the current gradients of <paramref name="tensors"/> into the EMAs (call after backward); tensors without a gradient are skipped.</summary>
    public void Update(IEnumerable<Tensor> tensors)
    {
        using var _ = torch.no_grad();
        foreach (var p in tensors)
        {
            using var scope = torch.NewDisposeScope();
            if (p.grad is not { } grad) continue;
            var ipt = p.mul(grad).abs();
            if (!state.TryGetValue(p, out var s))
            {
                s = (torch.zeros_like(p).DetachFromDisposeScope(), torch.zeros_like(p).DetachFromDisposeScope());
                state[p] = s;
            }
            s.avg.mul_(Beta1).add_(ipt, alpha: 1 - Beta1);
            s.unc.mul_(Beta2).add_(ipt.sub(s.avg).abs(), alpha: 1 - Beta2);
        }
    }

    /// <summary>Ī·Ū per entry of <paramref name="p"/> (zeros for a tensor never updated), a new tensor.</summary>
    public Tensor Score(Tensor p) => state.TryGetValue(p, out var s) ? s.avg.mul(s.unc) : torch.zeros_like(p);

    /// <summary>
    /// AdaLoRA's score of the rank-1 components of an update B·diag(E)·A: s(E_i) + mean_j s(A_ij) + mean_k s(B_ki), one
    /// value per component i (A: r×n, B: m×r, E: r×1 or null for an update without singular values).
    /// </summary>
    public Tensor ComponentScores(Tensor a, Tensor? e, Tensor b)
    {
        using var scope = torch.NewDisposeScope();
        var score = Score(a).mean([1]).add(Score(b).mean([0]));
        if (e is not null) score = score.add(Score(e).view(-1));
        return score.MoveToOuterDisposeScope();
    }

    /// <summary>A layer's tracked tensors named as in the adapter ("{path}.lora_A", ".lora_E", ".lora_B"), for <see cref="Save"/> and <see cref="Load"/>.</summary>
    public static IEnumerable<KeyValuePair<string, Tensor>> Named(string path, Tensor a, Tensor? e, Tensor b) =>
        e is null ? [new($"{path}.lora_A", a), new($"{path}.lora_B", b)] : [new($"{path}.lora_A", a), new($"{path}.lora_E", e), new($"{path}.lora_B", b)];

    /// <summary>
    /// The averages of the named tensors for a checkpoint, as "exp_avg_ipt.{name}" and "exp_avg_unc.{name}" (PEFT's
    /// RankAllocator fields); tensors never updated are left out.
    /// </summary>
    public Dictionary<string, Tensor> Save(IEnumerable<KeyValuePair<string, Tensor>> named)
    {
        var saved = new Dictionary<string, Tensor>();
        foreach (var (name, p) in named)
            if (state.TryGetValue(p, out var s))
            {
                saved[$"exp_avg_ipt.{name}"] = s.avg;
                saved[$"exp_avg_unc.{name}"] = s.unc;
            }
        return saved;
    }

    /// <summary>Replaces the statistics by <paramref name="saved"/> (<see cref="Save"/>'s names) for the named tensors.</summary>
    public void Load(IEnumerable<KeyValuePair<string, Tensor>> named, IReadOnlyDictionary<string, Tensor> saved)
    {
        Reset();
        using var _ = torch.no_grad();
        foreach (var (name, p) in named)
            if (saved.TryGetValue($"exp_avg_ipt.{name}", out var avg) && saved.TryGetValue($"exp_avg_unc.{name}", out var unc))
            {
                if (!avg.shape.SequenceEqual(p.shape) || !unc.shape.SequenceEqual(p.shape))
                    throw new ArgumentException($"saved importance of {name} has shape [{string.Join(", ", avg.shape)}], the tensor [{string.Join(", ", p.shape)}]");
                state[p] = (avg.to(p.dtype, p.device, copy: true).DetachFromDisposeScope(), unc.to(p.dtype, p.device, copy: true).DetachFromDisposeScope());
            }
    }

    /// <summary>Forgets every statistic (PEFT resets them when the final budget is fixed).</summary>
    public void Reset()
    {
        foreach (var (avg, unc) in state.Values)
        {
            avg.Dispose();
            unc.Dispose();
        }
        state.Clear();
    }

    public void Dispose() => Reset();
}
