using System.Diagnostics;
using LoRAHub.Abstractions;
using LoRAHub.Torch;
using LoRAHub.Torch.Optim;
using LoRAHub.Training.Checkpoints;
using LoRAHub.Training.Data;
using LoRAHub.Training.Reporting;

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
        var trainable = model.Root.named_parameters().Where(p => p.parameter.requires_grad).ToDictionary(p => p.name, p => p.parameter);
        var trainableList = trainable.Values.ToList();
        var loader = new DataLoader(trainData, options.BatchSize, padTokenId, options.Seed);

        torch.manual_seed(options.Seed);
        var state = new TrainerState();
        var resumedFrom = options.Resume ? checkpoints.Latest() : null;
        if (resumedFrom != null)
        {
            state = CheckpointManager.ReadState(resumedFrom);
            CheckpointManager.Restore(resumedFrom, trainable, optimizer);
            loader.Seek(state.LoaderPosition);
            scheduler.set_step(state.Step);
            RestoreRng(state, device);
            progress.Message($"resumed from {resumedFrom} at step {state.Step}");
        }
        else if (Directory.Exists(options.OutputDir))
        {
            foreach (var old in checkpoints.List()) Directory.Delete(old, recursive: true);
        }

        var metricsPath = Path.Combine(options.OutputDir, "metrics.jsonl");
        using var metrics = new MetricsLog(metricsPath, append: resumedFrom != null);
        if (device.IsCuda) torch.cuda.reset_peak_memory_stats(device.Index);
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
                var (loss, tokens, gradNorm, finite) = TrainStep(step, loader, device, optimizer, trainableList);
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
                    evalLoss = lastEval = Evaluate(evalData, padTokenId).Loss;
                    p.Message($"step {state.Step}: eval loss {evalLoss:0.0000}, perplexity {Math.Exp(evalLoss.Value):0.00}");
                }
                var record = new StepMetrics(state.Step, loss, optimizer.param_groups[0].lr, gradNorm,
                    tokens / Math.Max(1e-9, stepClock.Elapsed.TotalSeconds), state.TokensSeen, clock.Elapsed.TotalSeconds,
                    evalLoss, evalLoss.HasValue ? Math.Exp(evalLoss.Value) : null,
                    device.IsCuda ? torch.cuda.max_memory_allocated(device.Index) : null, !finite);
                metrics.Write(record);
                if (options.LogEvery > 0 && (state.Step % options.LogEvery == 0 || state.Step == options.MaxSteps)) p.Step(record, options.MaxSteps);

                StepCompleted?.Invoke(record);
                var stopping = cancellation.IsCancellationRequested;
                if ((options.SaveEvery > 0 && state.Step % options.SaveEvery == 0) || state.Step == options.MaxSteps || stopping)
                {
                    (state.Epoch, state.IndexInEpoch) = (loader.Position.Epoch, loader.Position.Index);
                    CaptureRng(state, device);
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
        if (evalData != null && lastEval == null) lastEval = Evaluate(evalData, padTokenId).Loss;
        var plotPath = Path.Combine(options.OutputDir, "loss.svg");
        LossPlot.Write(plotPath, metrics.Records);
        var elapsed = clock.Elapsed;
        return new TrainResult(state.Step, state.LossHistory, lastEval, elapsed, tokensThisRun / Math.Max(1e-9, elapsed.TotalSeconds),
            device.IsCuda ? torch.cuda.max_memory_allocated(device.Index) : null, options.OutputDir, metricsPath, plotPath, lastCheckpoint, skipped);
    }

    private (double loss, long tokens, double gradNorm, bool finite) TrainStep(long step, DataLoader loader, Device device, Optimizer optimizer, List<Tensor> trainable)
    {
        adapter.OnStepBegin(step);
        double lossSum = 0;
        long tokens = 0;
        try
        {
            for (var micro = 0; micro < options.GradientAccumulationSteps; micro++)
            {
                using var scope = torch.NewDisposeScope();
                using var batch = loader.Next(device);
                var loss = model.ComputeLoss(batch.InputIds, batch.Labels, batch.AttentionMask);
                if (adapter.AuxiliaryLoss() is Tensor aux) loss = loss + aux;
                if (LossInterceptor != null) loss = LossInterceptor(step, loss);
                (loss / options.GradientAccumulationSteps).backward();
                lossSum += loss.item<double>();
                tokens += batch.Tokens;
            }
        }
        catch (OutOfMemoryTorchException e)
        {
            optimizer.zero_grad();
            throw new TrainingException(
                $"out of GPU memory at step {step + 1} (batch size {options.BatchSize}, accumulation {options.GradientAccumulationSteps}). " +
                "Lower BatchSize (raise GradientAccumulationSteps to keep the effective batch), shorten the maximum sequence length, " +
                "turn on GradientCheckpointing, or quantize the base model (QLoRA). Checkpoints written so far are kept.", e);
        }
        var meanLoss = lossSum / options.GradientAccumulationSteps;
        if (!double.IsFinite(meanLoss))
        {
            optimizer.zero_grad();
            return (meanLoss, tokens, double.NaN, false);
        }
        adapter.OnAfterBackward(step);
        var gradNorm = torch.nn.utils.clip_grad_norm_(trainable, options.MaxGradNorm);
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

    /// <summary>Mean loss over the eval set (token-weighted) and its perplexity, without gradients.</summary>
    public (double Loss, double Perplexity) Evaluate(TextDataset data, int padTokenId = 0)
    {
        var wasTraining = model.Root.training;
        model.Root.eval();
        adapter.SetTraining(false);
        double total = 0;
        long count = 0;
        var loader = new DataLoader(data, options.BatchSize, padTokenId, options.Seed, shuffle: false);
        var batches = 0;
        using (torch.no_grad())
        {
            foreach (var batch in loader.Sequential(model.Device))
            {
                using var scope = torch.NewDisposeScope();
                using var b = batch;
                var n = b.LabelTokens - b.InputIds.size(0); // shifted labels: the first token of each row has no loss
                total += model.ComputeLoss(b.InputIds, b.Labels, b.AttentionMask).item<double>() * Math.Max(1, n);
                count += Math.Max(1, n);
                if (options.EvalBatches > 0 && ++batches >= options.EvalBatches) break;
            }
        }
        if (wasTraining)
        {
            model.Root.train();
            adapter.SetTraining(true);
        }
        var mean = total / Math.Max(1, count);
        return (mean, Math.Exp(mean));
    }

    private static void CaptureRng(TrainerState state, Device device)
    {
        using var cpu = torch.get_rng_state();
        state.CpuRngState = Convert.ToBase64String(cpu.data<byte>());
        if (device.IsCuda)
        {
            using var cuda = torch.cuda.get_rng_state(device.Index);
            state.CudaRngState = Convert.ToBase64String(cuda.data<byte>());
        }
    }

    private static void RestoreRng(TrainerState state, Device device)
    {
        if (state.CpuRngState.Length > 0)
        {
            var bytes = Convert.FromBase64String(state.CpuRngState);
            using var t = torch.tensor(bytes);
            torch.set_rng_state(t);
        }
        if (device.IsCuda && state.CudaRngState != null)
        {
            using var t = torch.tensor(Convert.FromBase64String(state.CudaRngState));
            torch.cuda.set_rng_state(t, device.Index);
        }
    }
}
