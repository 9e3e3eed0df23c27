namespace LoRAHub.Training;

/// <summary>
/// A run stopped by the host's Ctrl+C (<see cref="TrainingCancellation.Current"/>) after it saved a checkpoint: thrown by
/// <see cref="Trainer.Train"/> when its caller passed no token, so the script ends there as an interrupted program does
/// (`loraHub run` prints the message and exits 130). A caller that passes a token gets a <see cref="TrainResult"/> with
/// <see cref="TrainResult.Stopped"/> instead and goes on.
/// </summary>
public sealed class TrainingStoppedException(long step, string? checkpoint, CancellationToken token)
    : OperationCanceledException($"stopped at step {step}; to continue, run again with Resume = true" +
        (checkpoint is null ? "" : $" (checkpoint {checkpoint})"), token)
{
    /// <summary>The last step trained.</summary>
    public long Step => step;

    /// <summary>The checkpoint written at the stop (null on a rank that does not write them).</summary>
    public string? Checkpoint => checkpoint;
}
