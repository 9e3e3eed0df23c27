using System.Diagnostics;
using LoRAHub.Abstractions;
using LoRAHub.Distributed;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Optim;
using LoRAHub.Training.Checkpoints;
using LoRAHub.Training.Data;
using LoRAHub.Training.Parallel;
using LoRAHub.Training.Reporting;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Training;

/// <summary>
/// The training loop: gradient accumulation, AdamW (or the method's optimizer), warm-up + decay schedule,
/// gradient clipping, non-finite detection, periodic evaluation and atomic checkpoints with exact resume.
/// Runs wherever the model is (CUDA or CPU).
/// Data parallel without script changes: when the environment names several ranks (WORLD_SIZE &gt; 1, set by
/// `loraHub run --nproc-per-node N`), or a <see cref="ProcessGroup"/> is given, each rank trains on its slice of every
/// global batch (BatchSize rows per rank), the loss is normalised by the global count of target tokens, gradients are
/// all-reduced in buckets, clipping uses the global norm, optimizer state can be sharded (ZeRO-1), and only rank 0 logs,
/// plots and writes checkpoints. The update equals one rank's with a batch of BatchSize × WorldSize rows.
/// </summary>
public sealed class Trainer
{
    private readonly ICausalLanguageModel model;
    private readonly IAdapter adapter;
    private readonly TrainerOptions options;
    private readonly Action<string>? log;
    private const string MetricsFileName = "metrics.jsonl";
    private bool packing; // this run packs its micro-batches (TrainerOptions.Packing and the model supports it)

    public Trainer(ICausalLanguageModel model, IAdapter adapter, TrainerOptions options, Action<string>? log = null)
    {
        options.Validate();
        this.model = model;
        this.adapter = adapter;
        this.options = options;
        this.log = log;
    }

    /// <summary>
    /// The ranks to train with; null takes the default group, made from the environment when it names several ranks
    /// (<see cref="distributed.init_process_group"/>).
    /// </summary>
    public ProcessGroup? ProcessGroup { get; init; }

    /// <summary>Test hook: called with each step's loss before the non-finite check (e.g. to inject NaN).</summary>
    internal Func<long, Tensor, Tensor>? LossInterceptor { get; set; }

    /// <summary>Called after every optimizer step (progress hooks, early stopping through a cancellation token).</summary>
    public event Action<StepMetrics>? StepCompleted;

    /// <summary>
    /// Trains until MaxSteps or until the token is cancelled (Ctrl+C in the host); a cancelled run writes a checkpoint
    /// first, so `Resume` continues it exactly, and returns with <see cref="TrainResult.Stopped"/> (no final evaluation).
    /// Without a token it follows <see cref="TrainingCancellation.Current"/>, which `loraHub run` sets to its Ctrl+C
    /// token, and a stop ends in <see cref="TrainingStoppedException"/> after the checkpoint: the script stops there.
    /// </summary>
    public TrainResult Train(TextDataset trainData, TextDataset? evalData = null, int padTokenId = 0, CancellationToken cancellation = default)
    {
        // The host's Ctrl+C stops the run after the step (instead of ending the process) whatever token the caller passed:
        // the run follows both. Only a caller that passed none gets TrainingStoppedException at the stop.
        var host = TrainingCancellation.Current;
        var hostsToken = !cancellation.CanBeCanceled;
        using var following = host.CanBeCanceled ? TrainingCancellation.Follow() : null;
        using var both = !hostsToken && host.CanBeCanceled && cancellation != host ? CancellationTokenSource.CreateLinkedTokenSource(cancellation, host) : null;
        cancellation = hostsToken ? host : both?.Token ?? cancellation;
        var device = model.Device;
        var group = ProcessGroup ?? distributed.default_group ?? (distributed.is_distributed_environment() ? distributed.init_process_group(device) : null);
        var dp = new DataParallel(group is { WorldSize: > 1 } ? group : null, device);
        var progress = dp.IsMain ? new ProgressReporter(options.ShowProgress, log) : new ProgressReporter(false, _ => { });
        var checkpoints = new CheckpointManager(options.OutputDir, options.KeepLastCheckpoints);
        ClearEarlierRun(checkpoints, dp, progress);
        if (options.GradientCheckpointing) model.GradientCheckpointing = true;
        if (options.CheckpointPolicy is { } checkpointPolicy) model.CheckpointPolicy = checkpointPolicy;

        // Empty groups are left out, so that optimizer state keys ("group.index.name") are the same however the state is sharded.
        var groups = adapter.ParameterGroups(options.LearningRate, options.WeightDecay).Where(g => g.Parameters.Count > 0).ToList();
        var settings = new OptimizerSettings(options.LearningRate, options.WeightDecay, options.AdamBeta1, options.AdamBeta2, options.AdamEpsilon);
        Optimizer MakeOptimizer(IReadOnlyList<ParamGroup> g) =>
            adapter.CreateOptimizer(g, settings) ?? new AdamW(g, options.AdamBeta1, options.AdamBeta2, options.AdamEpsilon);
        var shard = dp.Group != null && (options.ShardOptimizerState ?? ShardsByDefault(adapter));
        using var optimizer = shard ? new ZeroRedundancyOptimizer(dp.Group!, groups, MakeOptimizer, options.BucketSizeBytes) : MakeOptimizer(groups);
        var scheduler = options.Schedule switch
        {
            LearningRateSchedule.Linear => LRScheduler.LinearWithWarmup(optimizer, options.WarmupSteps, options.MaxSteps),
            LearningRateSchedule.Cosine => LRScheduler.CosineWithWarmup(optimizer, options.WarmupSteps, options.MaxSteps),
            _ => LRScheduler.ConstantWithWarmup(optimizer, options.WarmupSteps),
        };
        var trainable = model.Root.named_parameters().Where(p => p.parameter.requires_grad).ToDictionary(p => p.name, p => (Tensor)p.parameter);
        var trainableList = trainable.Values.ToList();
        // Gradient all-reduce in buckets, started during backward as layers finish where the model marks them (ILayerInputHook).
        using var buckets = dp.Group != null ? new GradientSync(dp.Group, model, trainableList, options.BucketSizeBytes) : null;
        // One loader over global batches (BatchSize rows per rank): the same data order, and positions, for any number of ranks.
        var loader = new DataLoader(trainData, options.BatchSize * dp.WorldSize, padTokenId, options.Seed);

        torchx.manual_seed(options.Seed + dp.Rank);
        var state = new TrainerState();
        var resumedFrom = options.Resume ? checkpoints.Latest() : null;
        if (resumedFrom != null)
        {
            state = CheckpointManager.ReadState(resumedFrom);
            CheckpointManager.Restore(resumedFrom, trainable, optimizer, adapter);
            loader.Seek(state.LoaderPosition);
            // The schedule advances on finite steps only.
            scheduler.set_step(state.Step - state.SkippedSteps);
            if (dp.IsMain) RestoreRng(state);
            foreach (var damaged in checkpoints.Skipped) progress.Message($"skipped a damaged checkpoint: {damaged}");
            progress.Message($"resumed from {resumedFrom} at step {state.Step}");
        }
        else if (options.Resume)
            progress.Message($"resume: no checkpoint in {options.OutputDir}; training from step 0" +
                (File.Exists(Path.Combine(options.OutputDir, MetricsFileName)) ? $" (its {MetricsFileName} starts over)" : ""));
        // Every rank starts from rank 0's trainable weights (as DDP does), whatever each script's initialisation drew.
        if (dp.Group != null) ParameterBroadcast.Run(dp.Group, trainableList, 0, options.BucketSizeBytes);
        // Also: every rank has looked at OutputDir (ClearEarlierRun) before rank 0 writes metrics.jsonl into it.
        dp.Barrier();
        if (dp.Group != null)
            progress.Message($"data parallel: {dp.WorldSize} ranks ({dp.Group.Backend}), {buckets!.BucketCount} gradient buckets{(buckets.Overlapped ? " overlapped with backward" : "")}, " +
                $"global batch {options.BatchSize * dp.WorldSize}{(shard ? ", optimizer state sharded (ZeRO-1)" : "")}");

        var metricsPath = Path.Combine(options.OutputDir, MetricsFileName);
        using var metrics = dp.IsMain ? new MetricsLog(metricsPath, resumedFrom != null ? state.Step : null) : null;
        var records = metrics?.Records ?? new List<StepMetrics>();
        var cuda = device.type == DeviceType.CUDA;
        if (cuda) torchx.cuda.reset_peak_memory_stats(CudaIndex(device));
        var clock = Stopwatch.StartNew();
        long tokensThisRun = 0;
        string? lastCheckpoint = resumedFrom;
        double? lastEval = null;
        long? lastEvalStep = null;
        var stopped = false;

        model.Root.train();
        adapter.SetTraining(true);
        progress.Message(adapter.TrainableParametersReport());
        packing = options.Packing && model.SupportsPacking && !AuxiliaryLossCountsPadding(adapter);
        if (options.Packing && !packing)
            progress.Message(AuxiliaryLossCountsPadding(adapter)
                ? $"packing off: {adapter.Method.Name}'s auxiliary loss averages over every token of a row, padding included, so packed rows would change it; batches are padded"
                : $"packing off: {model.GetType().Name} cannot keep attention within packed examples here " +
                  "(a replaced attention function such as LongLoRA's, a router loss over rows, or no packing support); batches are padded");

        progress.Run(state.Step, options.MaxSteps, p =>
        {
            while (state.Step < options.MaxSteps)
            {
                var step = state.Step;
                var stepClock = Stopwatch.StartNew();
                var (loss, tokens, gradNorm, finite, stopRequested) = TrainStep(step, loader, device, optimizer, trainableList, lastCheckpoint, dp, buckets,
                    cancellation.IsCancellationRequested);
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
                    state.SkippedSteps++;
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
                    lastEvalStep = state.Step;
                    p.Message($"step {state.Step}: eval loss {evalLoss:0.0000}, perplexity {Math.Exp(evalLoss.Value):0.00}");
                }
                var record = new StepMetrics(state.Step, loss, optimizer.param_groups[0].lr, gradNorm,
                    tokens / Math.Max(1e-9, stepClock.Elapsed.TotalSeconds), state.TokensSeen, clock.Elapsed.TotalSeconds,
                    evalLoss, evalLoss.HasValue ? Math.Exp(evalLoss.Value) : null,
                    cuda ? torchx.cuda.max_memory_allocated(CudaIndex(device)) : null, !finite);
                if (metrics != null) metrics.Write(record);
                else records.Add(record);
                if (options.LogEvery > 0 && (state.Step % options.LogEvery == 0 || state.Step == options.MaxSteps)) p.Step(record, options.MaxSteps);

                StepCompleted?.Invoke(record);
                // Ranks agree on stopping (the flag travels with the step's loss), so they save and leave together.
                // A stop in the last step is no stop: the run is complete.
                var stopping = (dp.Group == null ? cancellation.IsCancellationRequested : stopRequested) && state.Step < options.MaxSteps;
                if ((options.SaveEvery > 0 && state.Step % options.SaveEvery == 0) || state.Step == options.MaxSteps || stopping)
                {
                    (state.Epoch, state.IndexInEpoch) = (loader.Position.Epoch, loader.Position.Index);
                    CaptureRng(state);
                    using (optimizer is ZeroRedundancyOptimizer zero ? zero.GatherToRank0(device) : null)
                        if (dp.IsMain) lastCheckpoint = checkpoints.Save(state.Step, trainable, optimizer, state, adapter);
                    dp.Barrier();
                    if (!dp.IsMain) lastCheckpoint = checkpoints.Latest();
                }
                if (stopping)
                {
                    stopped = true;
                    if (!hostsToken) p.Message($"stopped at step {state.Step}; resume with Resume = true (checkpoint {lastCheckpoint})");
                    break;
                }
            }
        });

        model.Root.eval();
        adapter.SetTraining(false);
        // The final weights are evaluated unless the last step just was (or the run was stopped: whoever stopped it wants
        // it to end), so a resumed run reports what an uninterrupted one does.
        if (evalData != null && lastEvalStep != state.Step && !stopped) lastEval = Evaluate(evalData, padTokenId, lastCheckpoint).Loss;
        var plotPath = Path.Combine(options.OutputDir, "loss.svg");
        if (dp.IsMain) LossPlot.Write(plotPath, records);
        if (stopped && hostsToken) throw new TrainingStoppedException(state.Step, lastCheckpoint, cancellation);
        var elapsed = clock.Elapsed;
        return new TrainResult(state.Step, state.LossHistory, lastEval, elapsed, tokensThisRun / Math.Max(1e-9, elapsed.TotalSeconds),
            cuda ? torchx.cuda.max_memory_allocated(CudaIndex(device)) : null, options.OutputDir, metricsPath, plotPath, lastCheckpoint, state.SkippedSteps, stopped);
    }

    /// <summary>
    /// A fresh run (Resume off) into an OutputDir that an earlier run wrote checkpoints or metrics.jsonl to: refused
    /// unless Overwrite, so a rerun never deletes them silently. Every rank looks at the shared folder before any of them
    /// writes there, so all decide alike; only rank 0 deletes.
    /// </summary>
    private void ClearEarlierRun(CheckpointManager checkpoints, DataParallel dp, ProgressReporter progress)
    {
        if (options.Resume) return;
        var earlier = checkpoints.List();
        // An empty log is a run that failed before its first step: nothing to keep.
        var metrics = new FileInfo(Path.Combine(options.OutputDir, MetricsFileName)) is { Exists: true, Length: > 0 };
        if (earlier.Count == 0 && !metrics) return;
        if (!options.Overwrite)
            throw new TrainingException(earlier.Count > 0
                ? $"{options.OutputDir} holds checkpoints of an earlier run (up to step {CheckpointManager.StepOf(earlier[^1])}); set Resume = true " +
                  "to continue it, Overwrite = true to start over (deletes them), or choose another OutputDir"
                : $"{options.OutputDir} holds the {MetricsFileName} of an earlier run; set Overwrite = true to start over (replaces it), " +
                  "or choose another OutputDir");
        if (!dp.IsMain) return;
        foreach (var old in earlier) Directory.Delete(old, recursive: true);
        progress.Message(earlier.Count > 0
            ? $"overwrite: deleted {earlier.Count} checkpoint{(earlier.Count == 1 ? "" : "s")} of an earlier run in {options.OutputDir}"
            : $"overwrite: replacing the {MetricsFileName} of an earlier run in {options.OutputDir}");
    }

    private (double loss, long tokens, double gradNorm, bool finite, bool stop) TrainStep(long step, DataLoader loader, Device device, Optimizer optimizer,
        List<Tensor> trainable, string? lastCheckpoint, DataParallel dp, GradientSync? buckets, bool stopRequested)
    {
        var shards = new List<(Batch batch, long targets)?>();
        try
        {
            SeedForStep(device, step, dp);
            adapter.OnStepBegin(step);
            // The loss is a mean over every target token of the step (all micro-batches, all ranks): count them first.
            for (var micro = 0; micro < options.GradientAccumulationSteps; micro++)
            {
                using var global = loader.Next(CPU);
                shards.Add(Packed(dp.Shard(global)));
            }
            long localTargets = shards.Sum(s => s?.targets ?? 0), tokens = shards.Sum(s => (long)(s?.batch.Tokens ?? 0));
            var totals = dp.SumOverRanks(localTargets, tokens);
            var globalTargets = Math.Max(1.0, totals[0]);
            tokens = (long)totals[1];
            var micros = options.GradientAccumulationSteps * dp.WorldSize;
            using var lossSum = torch.zeros(2, ScalarType.Float64, device);
            // The last micro-batch with targets ends the step: its backward starts the gradient all-reduce (DDP's no_sync before).
            var (syncIndex, shardIndex) = (shards.FindLastIndex(s => s?.targets > 0), -1);
            foreach (var shard in shards)
            {
                shardIndex++;
                if (shard is not var (batch, targets) || targets == 0) continue;
                using var scope = torch.NewDisposeScope();
                if (shardIndex == syncIndex) buckets?.prepare_for_backward();
                var loss = batch.PositionIds is Tensor positions ? model.ComputePackedLoss(batch.InputIds, batch.Labels, positions)
                    : model.ComputeLoss(batch.InputIds, batch.Labels, batch.AttentionMask);
                var weight = targets / globalTargets;
                Tensor objective = loss * weight;
                if (adapter.AuxiliaryLoss() is Tensor aux) objective = objective + aux / micros;
                if (LossInterceptor != null) objective = LossInterceptor(step, objective);
                // Only accumulation into .grad here: custom functions may write their parameters' gradients themselves (no copy).
                using (CustomFunction.AccumulateLeafGradients()) objective.backward();
                // The reported loss: Σ mean·count / global count, auxiliary terms as they entered the objective.
                using (torch.no_grad()) lossSum[0].add_(objective.detach().to(ScalarType.Float64));
            }
            if (stopRequested)
                using (var flag = lossSum[1]) flag.fill_(1);
            // Gradients, then the loss and the stop flag: on NCCL both are enqueued before the host waits for either.
            buckets?.finish();
            dp.SumOverRanks(lossSum);
            using var hostSums = lossSum.cpu();
            var sums = hostSums.data<double>().ToArray();
            dp.ThrowIfFailed();
            var meanLoss = sums[0];
            var stop = sums[1] > 0;
            if (!double.IsFinite(meanLoss))
            {
                ZeroGrad(trainable);
                return (meanLoss, tokens, double.NaN, false, stop);
            }
            adapter.OnAfterBackward(step);
            // After the all-reduce every rank holds the same gradients: the local norm is the global norm.
            var gradNorm = torchx.nn.utils.clip_grad_norm_(trainable, options.MaxGradNorm);
            if (!double.IsFinite(gradNorm))
            {
                ZeroGrad(trainable);
                return (meanLoss, tokens, gradNorm, false, stop);
            }
            optimizer.step();
            ZeroGrad(trainable);
            adapter.OnStepEnd(step);
            dp.ThrowIfFailed();
            return (meanLoss, tokens, gradNorm, true, stop);
        }
        catch (Exception e) when (TorchErrors.Translate(e) is OutOfMemoryTorchException oom)
        {
            // Free the gradients (and, on CUDA, the allocator's cached blocks) before the run ends.
            ZeroGrad(trainable);
            if (device.type == DeviceType.CUDA) torchx.cuda.empty_cache();
            throw OutOfMemory($"at step {step + 1}", device, oom, lastCheckpoint);
        }
        catch (Exception e) when (e is not DistributedException && TorchErrors.Translate(e) is TorchException typed && !ReferenceEquals(typed, e))
        {
            // A failed peer can surface as a CUDA error of an aborted collective: report the peer when the group knows.
            dp.ThrowIfFailed();
            throw typed;
        }
        finally
        {
            buckets?.reset(); // after a failure only: drops a reduction that backward left unfinished
            foreach (var s in shards) s?.batch.Dispose();
        }
    }

    // This rank's slice packed (when this run packs and the slice has padding); the same examples and target tokens.
    private (Batch batch, long targets)? Packed((Batch batch, long targets)? shard)
    {
        if (!packing || shard is not var (batch, targets) || SequencePacking.Pack(batch) is not Batch packed) return shard;
        batch.Dispose();
        return (packed, targets);
    }

    // All trainable gradients, not only the optimizer's (a ZeRO optimizer holds this rank's share).
    private static void ZeroGrad(List<Tensor> trainable)
    {
        foreach (var p in trainable) p.grad = null;
    }

    /// <summary>
    /// Methods whose auxiliary loss is a mean over the tokens a layer sees, padding included (MALoRA's router balance):
    /// packing removes padding, so it would not be the padded run's loss.
    /// </summary>
    private static bool AuxiliaryLossCountsPadding(IAdapter adapter) => adapter.Method.Name is "malora";

    /// <summary>Methods whose optimizer state is as large as the model (full, GaLore) shard it by default.</summary>
    private static bool ShardsByDefault(IAdapter adapter) => adapter.Method.Name is "full" or "galore";

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
        var dp = new DataParallel(ActiveGroup, model.Device);
        var pack = options.Packing && model.SupportsPacking && !AuxiliaryLossCountsPadding(adapter); // in eval mode
        try
        {
            using var noGrad = torch.no_grad();
            // With several ranks each evaluates every WorldSize-th batch; the sums are combined below.
            foreach (var batch in loader.Sequential(CPU))
            {
                using var scope = torch.NewDisposeScope();
                using var global = batch;
                if (batches++ % dp.WorldSize == dp.Rank)
                {
                    using var b = ToDevice(global, model.Device);
                    var n = b.LabelTokens - b.InputIds.size(0); // shifted labels: the first token of each row has no loss
                    // Packed rows hold the same examples and target tokens: the same mean, fewer rows to compute.
                    using var packed = pack ? SequencePacking.Pack(b) : null;
                    var loss = packed is null ? model.ComputeLoss(b.InputIds, b.Labels, b.AttentionMask)
                        : model.ComputePackedLoss(packed.InputIds, packed.Labels, packed.PositionIds!);
                    total += loss.ToDouble() * Math.Max(1, n);
                    count += Math.Max(1, n);
                }
                if (options.EvalBatches > 0 && batches >= options.EvalBatches) break;
            }
            var sums = dp.SumOverRanks(total, count);
            (total, count) = (sums[0], (long)sums[1]);
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

    private ProcessGroup? ActiveGroup => (ProcessGroup ?? distributed.default_group) is { WorldSize: > 1 } g ? g : null;

    private static Batch ToDevice(Batch b, Device device) => new()
    {
        InputIds = b.InputIds.to(device).DetachFromDisposeScope(),
        Labels = b.Labels.to(device).DetachFromDisposeScope(),
        AttentionMask = b.AttentionMask.to(device).DetachFromDisposeScope(),
        Tokens = b.Tokens,
        LabelTokens = b.LabelTokens,
    };

    // A device written "cuda" (no ordinal) means the current device, 0 unless a caller changed it.
    private static int CudaIndex(Device device) => Math.Max(0, device.index);

    /// <summary>
    /// libtorch's CUDA generator state cannot be read through TorchSharp, so CUDA randomness (dropout) is made a function
    /// of the step: every step reseeds the CUDA generators from (Seed, step, rank), and a resumed run continues exactly.
    /// Under data parallelism the CPU generator too (a checkpoint holds rank 0's state only); one process saves and
    /// restores its CPU state instead.
    /// </summary>
    private void SeedForStep(Device device, long step, DataParallel dp)
    {
        if (device.type != DeviceType.CUDA && dp.Group == null) return;
        var mixed = unchecked((ulong)options.Seed * 0x9E3779B97F4A7C15UL + (ulong)step * 0xBF58476D1CE4E5B9UL + (ulong)dp.Rank * 0x94D049BB133111EBUL);
        mixed ^= mixed >> 31;
        var seed = (long)(mixed & long.MaxValue);
        if (dp.Group != null) torchx.manual_seed(seed); // the CPU generator and every CUDA one
        else torch.cuda.manual_seed_all(seed);
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
