using LoRAHub.Training.Data;

namespace LoRAHub.Training.Checkpoints;

/// <summary>Everything besides tensors that a resumed run needs to continue exactly (trainer_state.json).</summary>
public sealed class TrainerState
{
    /// <summary>Optimizer steps completed.</summary>
    public long Step { get; set; }
    public int Epoch { get; set; }
    public int IndexInEpoch { get; set; }
    public int ConsecutiveNonFinite { get; set; }
    /// <summary>Steps skipped for non-finite values over the whole run (the learning-rate schedule did not advance on them).</summary>
    public int SkippedSteps { get; set; }
    public long TokensSeen { get; set; }
    /// <summary>libtorch's CPU generator state (base64), so dropout masks continue identically.</summary>
    public string CpuRngState { get; set; } = "";
    // No CUDA generator state: TorchSharp cannot read it, so the trainer reseeds CUDA from (Seed, step) at every step.
    public List<double> LossHistory { get; set; } = [];

    public LoaderPosition LoaderPosition => new(Epoch, IndexInEpoch);
}
