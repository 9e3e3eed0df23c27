using System.Diagnostics;
using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Optim;
using LoRAHub.Training.Checkpoints;
using LoRAHub.Training.Data;
using LoRAHub.Training.Reporting;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Training;

/// <summary>
/// The training loop: gradient accumulation, AdamW (or the method's optimizer), warm-up + decay schedule,
/// gradient clipping, non-finite detection, periodic evaluation and atomic checkpoints with exact resume.
/// Runs wherever the model is (CUDA or CPU).
/// </summary>
public sealed class Trainer
{
    private readonly ICausalLanguageModel model;
    private readonly IAdapter adapter;
    private readonly TrainerOptions options;
    private readonly Action<string>? log;

    public Trainer(ICausalLanguageModel model, IAdapter adapter, TrainerOptions options, Action<string>? log = null)
    {
        options.Validate();
        this.model = model;
        this.adapter = adapter;
        this.options = options;
        this.log = log;
    }

    /// <summary>Test hook: called with each step's loss before the non-finite check (e.g. to inject NaN).</summary>
    internal Func<long, Tensor, Tensor>? LossInterceptor { get; set; }

    /// <summary>Called after every optimizer step (progress hooks, early stopping through a cancellation token).</summary>
    public event Action<StepMetrics>? StepCompleted;

    /// <summary>
    /// Trains until MaxSteps or until the token is cancelled (Ctrl+C in the host); a cancelled run writes a checkpoint
    /// first, so `Resume` continues it exactly.
    /// </summary>
    public TrainResult Train(TextDataset trainData, TextDataset? evalData = null, int padTokenId = 0, CancellationToken cancellation = default)
    {
        var device = model.Device;
        var progress = new ProgressReporter(options.ShowProgress, log);
        var checkpoints = new CheckpointManager(options.OutputDir, options.KeepLastCheckpoints);
        if (options.GradientCheckpointing) model.GradientCheckpointing = true;

        var groups = adapter.ParameterGroups(options.LearningRate, options.WeightDecay);
        var settings = new OptimizerSettings(options.LearningRate, options.WeightDecay, options.AdamBeta1, options.AdamBeta2, options.AdamEpsilon);
        using var optimizer = adapter.CreateOptimizer(groups, settings) ?? new AdamW(groups, options.AdamBeta1, options.AdamBeta2, options.AdamEpsilon);
        var scheduler = options.Schedule switch
        {
            LearningRateSchedule.Linear => LRScheduler.LinearWithWarmup(optimizer, options.WarmupSteps, options.MaxSteps),
            LearningRateSchedule.Cosine => LRScheduler.CosineWithWarmup(optimizer, options.WarmupSteps, options.MaxSteps),
            _ => LRScheduler.ConstantWithWarmup(optimizer, options.WarmupSteps),
        };
        var trainable = model.Root.named_parameters().Where(p => p.parameter.requires_grad).ToDictionary(p => p.name, p => (Tensor)p.parameter);
        var trainableList = trainable.Values.ToList();
        var loader = new DataLoader(trainData, options.BatchSize, padTokenId, options.Seed);

        torchx.manual_seed(options.Seed);
        var state = new TrainerState();
        var resumedFrom = options.Resume ? checkpoints.Latest() : null;
        if (resumedFrom != null)
        {
            state = CheckpointManager.ReadState(resumedFrom);
            CheckpointManager.Restore(resumedFrom, trainable, optimizer);
            loader.Seek(state.LoaderPosition);
            scheduler.set_step(state.Step);
            RestoreRng(state);
            progress.Message($"resumed from {resumedFrom} at step {state.Step}");
        }
        else if (Directory.Exists(options.OutputDir))
        {
            foreach (var old in checkpoints.List()) Directory.Delete(old, recursive: true);
        }

        var metricsPath = Path.Combine(options.OutputDir, "metrics.jsonl");
        using var metrics = new MetricsLog(metricsPath, append: resumedFrom != null);
        var cuda = device.type == DeviceType.CUDA;
        if (cuda) torchx.cuda.reset_peak_memory_stats(CudaIndex(device));
        var clock = Stopwatch.StartNew();
        long tokensThisRun = 0;
        var skipped = 0;
        string? lastCheckpoint = resumedFrom;
        double? lastEval = null;

        model.Root.train();
        adapter.SetTraining(true);
        progress.Message(adapter.TrainableParametersReport());

        progress.Run(state.Step, options.MaxSteps, p =>
        {
            while (state.Step < options.MaxSteps)
            {
                var step = state.Step;
                var stepClock = Stopwatch.StartNew();
                var (loss, tokens, gradNorm, finite) = TrainStep(step, loader, device, optimizer, trainableList, lastCheckpoint);
                tokensThisRun += tokens;
                state.TokensSeen += tokens;
                state.Step++;
                if (finite)
                {
                    scheduler.step();
                    state.ConsecutiveNonFinite = 0;
                    state.LossHistory.Add(loss);
                }
                else
                {
                    skipped++;
                    state.ConsecutiveNonFinite++;
                    p.Message($"step {step + 1}: non-finite loss or gradient (loss {loss}, grad norm {gradNorm}); step skipped");
                    if (state.ConsecutiveNonFinite >= options.MaxConsecutiveNonFinite)
                        throw new TrainingException(
                            $"{state.ConsecutiveNonFinite} consecutive steps had non-finite loss or gradients; stopping. " +
                            "Lower the learning rate, check the data for empty or corrupt records, or train in float32." +
                            (lastCheckpoint != null ? $" The last good checkpoint is {lastCheckpoint}." : ""));
                }

                double? evalLoss = null;
                if (evalData != null && options.EvalEvery > 0 && state.Step % options.EvalEvery == 0)
                {
                    evalLoss = lastEval = Evaluate(evalData, padTokenId, lastCheckpoint).Loss;
                    p.Message($"step {state.Step}: eval loss {evalLoss:0.0000}, perplexity {Math.Exp(evalLoss.Value):0.00}");
                }
                var record = new StepMetrics(state.Step, loss, optimizer.param_groups[0].lr, gradNorm,
                    tokens / Math.Max(1e-9, stepClock.Elapsed.TotalSeconds), state.TokensSeen, clock.Elapsed.TotalSeconds,
                    evalLoss, evalLoss.HasValue ? Math.Exp(evalLoss.Value) : null,
                    cuda ? torchx.cuda.max_memory_allocated(CudaIndex(device)) : null, !finite);
                metrics.Write(record);
                if (options.LogEvery > 0 && (state.Step % options.LogEvery == 0 || state.Step == options.MaxSteps)) p.Step(record, options.MaxSteps);

                StepCompleted?.Invoke(record);
                var stopping = cancellation.IsCancellationRequested;
                if ((options.SaveEvery > 0 && state.Step % options.SaveEvery == 0) || state.Step == options.MaxSteps || stopping)
                {
                    (state.Epoch, state.IndexInEpoch) = (loader.Position.Epoch, loader.Position.Index);
                    CaptureRng(state);
                    lastCheckpoint = checkpoints.Save(state.Step, trainable, optimizer, state, adapter);
                }
                if (stopping)
                {
                    p.Message($"stopped at step {state.Step}; resume with Resume = true (checkpoint {lastCheckpoint})");
                    break;
                }
            }
        });

        model.Root.eval();
        adapter.SetTraining(false);
        if (evalData != null && lastEval == null) lastEval = Evaluate(evalData, padTokenId, lastCheckpoint).Loss;
        var plotPath = Path.Combine(options.OutputDir, "loss.svg");
        LossPlot.Write(plotPath, metrics.Records);
        var elapsed = clock.Elapsed;
        return new TrainResult(state.Step, state.LossHistory, lastEval, elapsed, tokensThisRun / Math.Max(1e-9, elapsed.TotalSeconds),
            cuda ? torchx.cuda.max_memory_allocated(CudaIndex(device)) : null, options.OutputDir, metricsPath, plotPath, lastCheckpoint, skipped);
    }

    private (double loss, long tokens, double gradNorm, bool finite) TrainStep(long step, DataLoader loader, Device device, Optimizer optimizer,
        List<Tensor> trainable, string? lastCheckpoint)
    {
        try
        {
            SeedCudaForStep(device, step);
            adapter.OnStepBegin(step);
            double lossSum = 0;
            long tokens = 0;
            for (var micro = 0; micro < options.GradientAccumulationSteps; micro++)
            {
                using var scope = torch.NewDisposeScope();
                using var batch = loader.Next(device);
                var loss = model.ComputeLoss(batch.InputIds, batch.Labels, batch.AttentionMask);
                if (adapter.AuxiliaryLoss() is Tensor aux) loss = loss + aux;
                if (LossInterceptor != null) loss = LossInterceptor(step, loss);
                (loss / options.GradientAccumulationSteps).backward();
                lossSum += loss.ToDouble();
                tokens += batch.Tokens;
            }
            var meanLoss = lossSum / options.GradientAccumulationSteps;
            if (!double.IsFinite(meanLoss))
            {
                optimizer.zero_grad();
                return (meanLoss, tokens, double.NaN, false);
            }
            adapter.OnAfterBackward(step);
            var gradNorm = torchx.nn.utils.clip_grad_norm_(trainable, options.MaxGradNorm);
            if (!double.IsFinite(gradNorm))
            {
                optimizer.zero_grad();
                return (meanLoss, tokens, gradNorm, false);
            }
            optimizer.step();
            optimizer.zero_grad();
            adapter.OnStepEnd(step);
            return (meanLoss, tokens, gradNorm, true);
        }
        catch (Exception e) when (TorchErrors.Translate(e) is OutOfMemoryTorchException oom)
        {
            // Free the gradients (and, on CUDA, the allocator's cached blocks) before the run ends.
            optimizer.zero_grad();
            if (device.type == DeviceType.CUDA) torchx.cuda.empty_cache();
            throw OutOfMemory($"at step {step + 1}", device, oom, lastCheckpoint);
        }
        catch (Exception e) when (TorchErrors.Translate(e) is TorchException typed && !ReferenceEquals(typed, e))
        {
            throw typed;
        }
    }

    /// <summary>What to reduce, and where the run can resume: the trainer's answer to an out-of-memory error.</summary>
    private TrainingException OutOfMemory(string when, Device device, OutOfMemoryTorchException oom, string? lastCheckpoint) => new(
        $"out of memory on {device} {when} (batch size {options.BatchSize}, accumulation {options.GradientAccumulationSteps}). " +
        "Lower BatchSize (raise GradientAccumulationSteps to keep the effective batch), shorten the maximum sequence length, " +
        "turn on GradientCheckpointing, or quantize the base model (QLoRA). " +
        (lastCheckpoint != null
            ? $"The run can resume from its last checkpoint {lastCheckpoint} with Resume = true."
            : "No checkpoint was written yet; set SaveEvery so that a later run can resume with Resume = true.") +
        $"\n{oom.Message.Split('\n')[0].TrimEnd()}", oom);

    /// <summary>Mean loss over the eval set (token-weighted) and its perplexity, without gradients.</summary>
    public (double Loss, double Perplexity) Evaluate(TextDataset data, int padTokenId = 0) => Evaluate(data, padTokenId, lastCheckpoint: null);

    private (double Loss, double Perplexity) Evaluate(TextDataset data, int padTokenId, string? lastCheckpoint)
    {
        var wasTraining = model.Root.training;
        model.Root.eval();
        adapter.SetTraining(false);
        double total = 0;
        long count = 0;
        var loader = new DataLoader(data, options.BatchSize, padTokenId, options.Seed, shuffle: false);
        var batches = 0;
        try
        {
            using var noGrad = torch.no_grad();
            foreach (var batch in loader.Sequential(model.Device))
            {
                using var scope = torch.NewDisposeScope();
                using var b = batch;
                var n = b.LabelTokens - b.InputIds.size(0); // shifted labels: the first token of each row has no loss
                total += model.ComputeLoss(b.InputIds, b.Labels, b.AttentionMask).ToDouble() * Math.Max(1, n);
                count += Math.Max(1, n);
                if (options.EvalBatches > 0 && ++batches >= options.EvalBatches) break;
            }
        }
        catch (Exception e) when (TorchErrors.Translate(e) is OutOfMemoryTorchException oom)
        {
            throw OutOfMemory("during evaluation", model.Device, oom, lastCheckpoint);
        }
        catch (Exception e) when (TorchErrors.Translate(e) is TorchException typed && !ReferenceEquals(typed, e))
        {
            throw typed;
        }
        if (wasTraining)
        {
            model.Root.train();
            adapter.SetTraining(true);
        }
        var mean = total / Math.Max(1, count);
        return (mean, Math.Exp(mean));
    }

    // A device written "cuda" (no ordinal) means the current device, 0 unless a caller changed it.
    private static int CudaIndex(Device device) => Math.Max(0, device.index);

    /// <summary>
    /// libtorch's CUDA generator state cannot be read through TorchSharp, so CUDA randomness (dropout) is made a function
    /// of the step: every step reseeds the CUDA generators from (Seed, step), and a resumed run continues exactly.
    /// </summary>
    private void SeedCudaForStep(Device device, long step)
    {
        if (device.type != DeviceType.CUDA) return;
        var mixed = unchecked((ulong)options.Seed * 0x9E3779B97F4A7C15UL + (ulong)step * 0xBF58476D1CE4E5B9UL);
        mixed ^= mixed >> 31;
        torch.cuda.manual_seed_all((long)(mixed & long.MaxValue));
    }

    private static void CaptureRng(TrainerState state)
    {
        using var cpu = torch.get_rng_state();
        state.CpuRngState = Convert.ToBase64String(cpu.data<byte>().ToArray());
    }

    private static void RestoreRng(TrainerState state)
    {
        if (state.CpuRngState.Length == 0) return;
        using var t = torch.tensor(Convert.FromBase64String(state.CpuRngState));
        torch.set_rng_state(t);
    }
}
