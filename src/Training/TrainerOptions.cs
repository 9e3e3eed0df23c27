namespace LoRAHub.Training;

public enum LearningRateSchedule { Constant, Linear, Cosine }

/// <summary>
/// What the trainer does. Names follow transformers' TrainingArguments where they match one (OutputDir, MaxSteps,
/// GradientAccumulationSteps, LearningRate, WeightDecay, AdamBeta1/2, AdamEpsilon, WarmupSteps, MaxGradNorm, Seed,
/// GradientCheckpointing); docs/trainer.md maps the rest (BatchSize ↔ per_device_train_batch_size, SaveEvery ↔
/// save_steps, EvalEvery ↔ eval_steps, LogEvery ↔ logging_steps, KeepLastCheckpoints ↔ save_total_limit, ...).
/// </summary>
public sealed class TrainerOptions
{
    public string OutputDir { get; set; } = "runs/default";
    public long MaxSteps { get; set; } = 100;
    /// <summary>Examples per micro-batch on each rank (per_device_train_batch_size); a step takes GradientAccumulationSteps of them.</summary>
    public int BatchSize { get; set; } = 8;
    public int GradientAccumulationSteps { get; set; } = 1;
    public double LearningRate { get; set; } = 2e-4;
    public double WeightDecay { get; set; } = 0.0;
    public double AdamBeta1 { get; set; } = 0.9;
    public double AdamBeta2 { get; set; } = 0.999;
    public double AdamEpsilon { get; set; } = 1e-8;
    public long WarmupSteps { get; set; }
    public LearningRateSchedule Schedule { get; set; } = LearningRateSchedule.Cosine;
    /// <summary>Gradient-norm clipping; 0 turns it off.</summary>
    public double MaxGradNorm { get; set; } = 1.0;
    public long EvalEvery { get; set; } = 0;
    /// <summary>Batches used per evaluation (0 = the whole eval set).</summary>
    public int EvalBatches { get; set; } = 0;
    public long SaveEvery { get; set; } = 0;
    /// <summary>How many checkpoints to keep (oldest removed first).</summary>
    public int KeepLastCheckpoints { get; set; } = 2;
    public long Seed { get; set; } = 42;
    public long LogEvery { get; set; } = 1;
    /// <summary>The run stops after this many consecutive non-finite losses or gradients.</summary>
    public int MaxConsecutiveNonFinite { get; set; } = 5;
    public bool GradientCheckpointing { get; set; }
    /// <summary>
    /// Padding-free packing (on by default): each micro-batch's examples are packed end to end into as few rows as fit
    /// (no row longer than its longest example), positions restarting per example, attention never crossing one; taken
    /// only where it is exact (<see cref="Abstractions.ICausalLanguageModel.SupportsPacking"/>), so the loss equals the
    /// padded run's. Off: padded batches, one example per row.
    /// </summary>
    public bool Packing { get; set; } = true;
    /// <summary>
    /// Per-layer checkpointing: none, all, offload (inputs parked in pinned host memory), or a memory budget
    /// (<see cref="LoRAHub.TorchExtensions.CheckpointPolicy.Budget"/>); set on the model when not null, and wins over
    /// <see cref="GradientCheckpointing"/>.
    /// </summary>
    public LoRAHub.TorchExtensions.CheckpointPolicy? CheckpointPolicy { get; set; }
    public bool ShowProgress { get; set; } = true;
    /// <summary>Continue from the newest checkpoint in OutputDir when there is one.</summary>
    public bool Resume { get; set; }
    /// <summary>
    /// Start over in an OutputDir that holds an earlier run (transformers' overwrite_output_dir): its checkpoints are
    /// deleted and metrics.jsonl replaced. Off (the default), a run without <see cref="Resume"/> refuses such a folder
    /// before doing any work, so a rerun never deletes checkpoints silently. Resume wins when both are set.
    /// </summary>
    public bool Overwrite { get; set; }
    /// <summary>
    /// Data parallel: shard optimizer state across ranks (ZeRO-1). Null: on for methods whose state is as large as the
    /// model (full, galore), off otherwise. Ignored with one rank.
    /// </summary>
    public bool? ShardOptimizerState { get; set; }
    /// <summary>Data parallel: bytes per flattened gradient bucket (PyTorch DDP's bucket_cap_mb, 25 MB).</summary>
    public long BucketSizeBytes { get; set; } = 25L * 1024 * 1024;

    internal void Validate()
    {
        void Require(bool ok, string message)
        {
            if (!ok) throw new ArgumentException("trainer options: " + message);
        }
        Require(MaxSteps > 0, $"MaxSteps must be positive (got {MaxSteps})");
        Require(BatchSize > 0, $"BatchSize must be positive (got {BatchSize})");
        Require(GradientAccumulationSteps > 0, $"GradientAccumulationSteps must be positive (got {GradientAccumulationSteps})");
        Require(LearningRate > 0 && double.IsFinite(LearningRate), $"LearningRate must be a positive number (got {LearningRate})");
        Require(WarmupSteps >= 0 && WarmupSteps <= MaxSteps, $"WarmupSteps must be between 0 and MaxSteps (got {WarmupSteps})");
        Require(KeepLastCheckpoints >= 1, "KeepLastCheckpoints must be at least 1");
        Require(!string.IsNullOrWhiteSpace(OutputDir), "OutputDir is required");
        Require(BucketSizeBytes > 0, $"BucketSizeBytes must be positive (got {BucketSizeBytes})");
    }
}
