using System.Text.Json;
using LoRAHub.Models.Llama;
using LoRAHub.Training.Checkpoints;

namespace LoRAHub.Training.Tests;

/// <summary>Stopping and resuming in the combinations a user may set: each compares a stopped-and-resumed run with an uninterrupted one.</summary>
[Collection(GlobalRngCollection.Name)]
public sealed class ResumeExactnessTests : IDisposable
{
    private readonly string dir = Path.Combine(Path.GetTempPath(), "lorahub-resume-exact-" + Guid.NewGuid().ToString("N"));
    private static readonly CharTokenizer Tok = TrainingData.Tok;

    public void Dispose()
    {
        if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
    }

    private static TextDataset Data() => TrainingData.ShiftByOne();

    private TrainerOptions Options(string name, long steps, Action<TrainerOptions>? more = null)
    {
        var o = new TrainerOptions
        {
            OutputDir = Path.Combine(dir, name), MaxSteps = steps, BatchSize = 8, LearningRate = 1e-2, WarmupSteps = 2,
            SaveEvery = 0, ShowProgress = false, LogEvery = 0, Seed = 7,
        };
        more?.Invoke(o);
        return o;
    }

    private static (TinyLanguageModel model, Trainer trainer) Make(TrainerOptions options, List<string>? log = null)
    {
        var model = new TinyLanguageModel(Tok.VocabSize);
        return (model, new Trainer(model, new FullFineTune(model), options, s => log?.Add(s)));
    }

    private static List<JsonElement> Metrics(string file) =>
        File.ReadAllLines(file).Select(l => JsonDocument.Parse(l).RootElement.Clone()).ToList();

    private static TrainResult StopAt(Trainer trainer, long step, TextDataset train, TextDataset? eval = null)
    {
        using var stop = new CancellationTokenSource();
        trainer.StepCompleted += m => { if (m.Step == step) stop.Cancel(); };
        return trainer.Train(train, eval, cancellation: stop.Token);
    }

    /// <summary>
    /// A skipped (non-finite) step does not advance the schedule (docs/trainer.md), so resume sets the schedule to the
    /// steps that were not skipped: the same learning rates and losses as the uninterrupted run.
    /// </summary>
    [Theory]
    [InlineData(LearningRateSchedule.Linear)]
    [InlineData(LearningRateSchedule.Cosine)]
    [InlineData(LearningRateSchedule.Constant)]
    public void Resume_after_a_skipped_step_keeps_the_learning_rate_schedule(LearningRateSchedule schedule)
    {
        void Set(TrainerOptions o) { o.Schedule = schedule; o.WarmupSteps = 8; }
        var (m1, full) = Make(Options("skip-full", 12, Set));
        using var _1 = m1;
        var calls = 0;
        m1.LossOverride = loss => ++calls == 3 ? loss * double.NaN : loss; // step 3 is skipped
        var expected = full.Train(Data());
        Assert.Equal(1, expected.SkippedSteps);

        var (m2, part) = Make(Options("skip-resumed", 12, Set));
        using var _2 = m2;
        var calls2 = 0;
        m2.LossOverride = loss => ++calls2 == 3 ? loss * double.NaN : loss;
        Assert.True(StopAt(part, 6, Data()).Stopped);
        var second = Options("skip-resumed", 12, Set);
        second.Resume = true;
        var (m3, rest) = Make(second);
        using var _3 = m3;
        var resumed = rest.Train(Data());

        var lrFull = Metrics(expected.MetricsFile).Select(e => e.GetProperty("learning_rate").GetDouble()).ToList();
        var lrResumed = Metrics(resumed.MetricsFile).Select(e => e.GetProperty("learning_rate").GetDouble()).ToList();
        Assert.Equal(lrFull, lrResumed);
        Assert.Equal(expected.Losses, resumed.Losses);
    }

    /// <summary>TrainResult.SkippedSteps covers the whole run, as Steps and Losses do.</summary>
    [Fact]
    public void A_resumed_result_counts_the_steps_skipped_before_the_stop()
    {
        var (m1, part) = Make(Options("skip-count", 10));
        using var _1 = m1;
        var calls = 0;
        m1.LossOverride = loss => ++calls == 3 ? loss * double.NaN : loss;
        Assert.Equal(1, StopAt(part, 5, Data()).SkippedSteps);
        var second = Options("skip-count", 10);
        second.Resume = true;
        var (m2, rest) = Make(second);
        using var _2 = m2;
        var resumed = rest.Train(Data());
        Assert.Equal((10L, 9), (resumed.Steps, resumed.Losses.Count));
        Assert.Equal(1, resumed.SkippedSteps);
    }

    /// <summary>
    /// With EvalEvery not dividing MaxSteps, both the uninterrupted and the resumed run evaluate the final weights (not the
    /// uninterrupted run's stale eval at step 8).
    /// </summary>
    [Fact]
    public void A_resumed_run_reports_the_same_final_eval_loss()
    {
        var (train, eval) = Data().Split(0.25, 1);
        void Set(TrainerOptions o) => o.EvalEvery = 4;
        var (m1, full) = Make(Options("eval-full", 10, Set));
        using var _1 = m1;
        var expected = full.Train(train, eval);

        var (m2, part) = Make(Options("eval-resumed", 10, Set));
        using var _2 = m2;
        StopAt(part, 9, train, eval);
        var second = Options("eval-resumed", 10, Set);
        second.Resume = true;
        var (m3, rest) = Make(second);
        using var _3 = m3;
        var resumed = rest.Train(train, eval);
        Assert.Equal(expected.Losses, resumed.Losses); // training itself is exact
        Assert.Equal(expected.FinalEvalLoss, resumed.FinalEvalLoss);
    }

    /// <summary>
    /// A token cancelled during the last step: the run has completed MaxSteps, so it is not Stopped and gets its final
    /// evaluation; under the host's token it does not throw TrainingStoppedException (nothing is left to resume).
    /// </summary>
    [Fact]
    public void Cancelling_during_the_last_step_is_a_completed_run()
    {
        var (train, eval) = Data().Split(0.25, 1);
        var (m1, trainer) = Make(Options("last-step", 6));
        using var _1 = m1;
        var result = StopAt(trainer, 6, train, eval);
        Assert.Equal(6, result.Steps);
        Assert.False(result.Stopped);         
        Assert.NotNull(result.FinalEvalLoss); 
    }

    [Fact]
    public void Cancelling_the_hosts_token_during_the_last_step_does_not_throw()
    {
        var (m1, trainer) = Make(Options("last-step-host", 6));
        using var _1 = m1;
        using var stop = new CancellationTokenSource();
        trainer.StepCompleted += m => { if (m.Step == 6) stop.Cancel(); };
        using (TrainingCancellation.Use(stop.Token))
        {
            var result = trainer.Train(Data());
            Assert.Equal((6L, false), (result.Steps, result.Stopped));
        }
    }

    /// <summary>
    /// Resume fell back past a damaged newer checkpoint (6), then saves 5 with KeepLastCheckpoints = 1: pruning keeps the
    /// checkpoint just written (the damaged 6 does not count), so LastCheckpoint exists and the next resume finds it.
    /// </summary>
    [Fact]
    public void Pruning_after_a_fallback_resume_keeps_the_new_checkpoint_not_the_damaged_one()
    {
        void Set(TrainerOptions o) => o.SaveEvery = 2;
        var (m1, first) = Make(Options("prune", 10, Set));
        using var _1 = m1;
        StopAt(first, 6, Data()); // checkpoints 4 and 6 (KeepLastCheckpoints 2)
        var damaged = Path.Combine(dir, "prune", "checkpoint-000006", CheckpointManager.OptimizerFile);
        var bytes = File.ReadAllBytes(damaged);
        bytes[^1] ^= 1;
        File.WriteAllBytes(damaged, bytes);

        var second = Options("prune", 10, o => { Set(o); o.KeepLastCheckpoints = 1; o.Resume = true; });
        var (m2, rest) = Make(second);
        using var _2 = m2;
        var stopped = StopAt(rest, 5, Data());
        Assert.EndsWith("checkpoint-000005", stopped.LastCheckpoint);
        var left = string.Join(", ", Directory.GetDirectories(second.OutputDir, "checkpoint-*").Select(Path.GetFileName).Order());
        Assert.True(Directory.Exists(stopped.LastCheckpoint), $"LastCheckpoint was pruned; left: {left}");
        Assert.EndsWith("checkpoint-000005", new CheckpointManager(second.OutputDir, 1).Latest());
    }

    /// <summary>
    /// docs/trainer.md's early stopping passes a token of the script's own (here linked to the host's): Train still follows
    /// the host's Ctrl+C token (TrainingCancellation.Following), so Ctrl+C stops it gracefully instead of ending the process.
    /// </summary>
    [Fact]
    public void Training_with_a_token_linked_to_the_hosts_follows_ctrl_c()
    {
        var (m1, trainer) = Make(Options("linked", 3));
        using var _1 = m1;
        using var host = new CancellationTokenSource();
        using var own = CancellationTokenSource.CreateLinkedTokenSource(host.Token);
        var following = new List<bool>();
        trainer.StepCompleted += _ => following.Add(TrainingCancellation.Following);
        using (TrainingCancellation.Use(host.Token))
            trainer.Train(Data(), cancellation: own.Token);
        Assert.Equal([true, true, true], following);
    }

    /// <summary>The host's Ctrl+C stops a run given an unrelated token of the script's: it returns Stopped (the script goes on).</summary>
    [Fact]
    public void The_hosts_ctrl_c_stops_a_run_given_a_token_of_its_own_and_it_returns()
    {
        var (m1, trainer) = Make(Options("own", 10));
        using var _1 = m1;
        using var host = new CancellationTokenSource();
        using var own = new CancellationTokenSource();
        trainer.StepCompleted += m => { if (m.Step == 3) host.Cancel(); };
        TrainResult result;
        using (TrainingCancellation.Use(host.Token))
            result = trainer.Train(Data(), cancellation: own.Token);
        Assert.Equal((3L, true), (result.Steps, result.Stopped));
        Assert.True(Directory.Exists(result.LastCheckpoint));
        Assert.False(own.IsCancellationRequested);
    }

    [Fact]
    public void Fallback_resume_past_a_damaged_checkpoint_is_exact_and_logs_each_step_once()
    {
        var (train, eval) = Data().Split(0.25, 1);
        void Set(TrainerOptions o) { o.SaveEvery = 2; o.EvalEvery = 3; o.Schedule = LearningRateSchedule.Linear; o.WarmupSteps = 3; }
        var (m0, full) = Make(Options("fb-full", 10, Set));
        using var _0 = m0;
        var expected = full.Train(train, eval);

        var (m1, first) = Make(Options("fb", 10, Set));
        using var _1 = m1;
        StopAt(first, 6, train, eval);
        var damaged = Path.Combine(dir, "fb", "checkpoint-000006", CheckpointManager.TrainableFile);
        var bytes = File.ReadAllBytes(damaged);
        bytes[^1] ^= 1;
        File.WriteAllBytes(damaged, bytes);
        var log = new List<string>();
        var second = Options("fb", 10, o => { Set(o); o.Resume = true; });
        var (m2, rest) = Make(second, log);
        using var _2 = m2;
        var resumed = rest.Train(train, eval);
        Assert.Contains(log, l => l.Contains("resumed from") && l.Contains("checkpoint-000004"));
        Assert.Equal(expected.Losses, resumed.Losses);
        Assert.Equal(expected.FinalEvalLoss, resumed.FinalEvalLoss);
        var a = Metrics(expected.MetricsFile);
        var b = Metrics(resumed.MetricsFile);
        Assert.Equal(Enumerable.Range(1, 10).Select(i => (long)i), b.Select(e => e.GetProperty("step").GetInt64()));
        foreach (var key in new[] { "loss", "learning_rate", "grad_norm", "tokens", "eval_loss", "skipped" })
            Assert.Equal(a.Select(e => e.GetProperty(key).ToString()), b.Select(e => e.GetProperty(key).ToString()));
        Assert.Equal(File.ReadAllText(expected.PlotFile), File.ReadAllText(resumed.PlotFile));
        Assert.Equal(["checkpoint-000008", "checkpoint-000010"], Directory.GetDirectories(Path.Combine(dir, "fb"), "checkpoint-*").Select(Path.GetFileName).Order());
    }

    private static TextDataset UnequalRows() => TrainingData.UnequalRows();

    private static LlamaConfig TinyLlama() => TrainingData.TinyLlama();

    /// <summary>Tiny Llama, accumulation 2, eval every 3, SaveEvery 2 / keep 2, each schedule with warm-up, packing on and off.</summary>
    [Theory]
    [InlineData(true, LearningRateSchedule.Cosine)]
    [InlineData(true, LearningRateSchedule.Linear)]
    [InlineData(true, LearningRateSchedule.Constant)]
    [InlineData(false, LearningRateSchedule.Cosine)]
    public void Llama_with_accumulation_packing_and_eval_resumes_exactly(bool packing, LearningRateSchedule schedule)
    {
        var all = UnequalRows();
        var (train, eval) = all.Split(0.2, 1);
        TrainResult Run(string name, long? stopAt, bool resume, List<string>? log = null)
        {
            using var llama = LlamaForCausalLM.CreateRandom(TinyLlama(), ScalarType.Float32, CPU, seed: 2);
            var trainer = new Trainer(llama, new FullFineTune(llama), new TrainerOptions
            {
                OutputDir = Path.Combine(dir, name), MaxSteps = 8, BatchSize = 4, GradientAccumulationSteps = 2, LearningRate = 1e-2,
                WarmupSteps = 3, Schedule = schedule, ShowProgress = false, LogEvery = 0, Seed = 3, Packing = packing,
                EvalEvery = 3, SaveEvery = 2, KeepLastCheckpoints = 2, Resume = resume,
            }, s => log?.Add(s));
            return stopAt is long s ? StopAt(trainer, s, train, eval) : trainer.Train(train, eval);
        }
        var expected = Run("llama-full", null, false);
        Run("llama-resumed", 5, false);
        var log = new List<string>();
        var resumed = Run("llama-resumed", null, true, log);
        Assert.DoesNotContain(log, l => l.Contains("packing off"));
        Assert.Equal(expected.Losses, resumed.Losses);
        Assert.Equal(expected.FinalEvalLoss, resumed.FinalEvalLoss);
        var a = Metrics(expected.MetricsFile);
        var b = Metrics(resumed.MetricsFile);
        Assert.Equal(Enumerable.Range(1, 8).Select(i => (long)i), b.Select(e => e.GetProperty("step").GetInt64()));
        foreach (var key in new[] { "loss", "learning_rate", "grad_norm", "tokens", "eval_loss" })
            Assert.Equal(a.Select(e => e.GetProperty(key).ToString()), b.Select(e => e.GetProperty(key).ToString()));
        Assert.Equal(File.ReadAllText(expected.PlotFile), File.ReadAllText(resumed.PlotFile));
        Assert.Equal(["checkpoint-000006", "checkpoint-000008"],
            Directory.GetDirectories(Path.Combine(dir, "llama-resumed"), "checkpoint-*").Select(Path.GetFileName).Order());
    }

    [Fact]
    public void The_hosts_token_throws_after_the_checkpoint_and_the_run_resumes_exactly()
    {
        var (m0, full) = Make(Options("host-full", 10));
        using var _0 = m0;
        var expected = full.Train(Data());

        var (m1, part) = Make(Options("host", 10));
        using var _1 = m1;
        using var stop = new CancellationTokenSource();
        part.StepCompleted += m => { if (m.Step == 4) stop.Cancel(); };
        TrainingStoppedException e;
        using (TrainingCancellation.Use(stop.Token))
            e = Assert.Throws<TrainingStoppedException>(() => part.Train(Data()));
        Assert.Equal(4, e.Step);
        Assert.EndsWith("checkpoint-000004", e.Checkpoint);
        Assert.True(File.Exists(Path.Combine(dir, "host", "loss.svg")));
        Assert.False(TrainingCancellation.Following);
        var (m2, rest) = Make(Options("host", 10, o => o.Resume = true));
        using var _2 = m2;
        var resumed = rest.Train(Data());
        Assert.Equal(expected.Losses, resumed.Losses);
        Assert.Equal(10, File.ReadAllLines(resumed.MetricsFile).Length);
    }

    [Fact]
    public void A_changed_MaxSteps_on_resume_extends_or_ends_the_run()
    {
        void Set(TrainerOptions o) { o.Schedule = LearningRateSchedule.Constant; o.WarmupSteps = 2; }
        var (m0, full) = Make(Options("max-full", 12, Set));
        using var _0 = m0;
        var expected = full.Train(Data());

        var (m1, part) = Make(Options("max", 10, Set));
        using var _1 = m1;
        StopAt(part, 5, Data());
        // Resumed with a smaller MaxSteps than the checkpoint: nothing to train, nothing lost.
        var (m2, none) = Make(Options("max", 4, o => { Set(o); o.Resume = true; }));
        using var _2 = m2;
        var r0 = none.Train(Data());
        Assert.Equal((5L, false), (r0.Steps, r0.Stopped));
        Assert.Equal(5, File.ReadAllLines(r0.MetricsFile).Length);
        // Then extended past the first MaxSteps: the same as an uninterrupted 12-step run (a constant schedule).
        var (m3, more) = Make(Options("max", 12, o => { Set(o); o.Resume = true; }));
        using var _3 = m3;
        var r1 = more.Train(Data());
        Assert.Equal(expected.Losses, r1.Losses);
        Assert.Equal(Enumerable.Range(1, 12).Select(i => (long)i), Metrics(r1.MetricsFile).Select(e => e.GetProperty("step").GetInt64()));
    }

    /// <summary>Resume with no checkpoint to resume: a run from step 0 that says so (transformers raises; a script rerun after an early crash should just start).</summary>
    [Fact]
    public void Resume_without_a_checkpoint_trains_from_the_start_and_says_so()
    {
        var log = new List<string>();
        var (m1, trainer) = Make(Options("none", 3, o => o.Resume = true), log);
        using var _1 = m1;
        Assert.Equal(3, trainer.Train(Data()).Steps);
        Assert.Contains(log, l => l == $"resume: no checkpoint in {Path.Combine(dir, "none")}; training from step 0");
    }

    /// <summary>A streak of non-finite steps across the stop: the count continues after resume.</summary>
    [Fact]
    public void A_non_finite_streak_across_a_stop_still_ends_the_run_at_the_limit()
    {
        void Set(TrainerOptions o) => o.MaxConsecutiveNonFinite = 4;
        var (m1, part) = Make(Options("streak", 12, Set));
        using var _1 = m1;
        var calls = 0;
        m1.LossOverride = loss => ++calls >= 4 ? loss * double.NaN : loss; // steps 4.. non-finite
        StopAt(part, 5, Data()); // 2 in a row at the stop
        var (m2, rest) = Make(Options("streak", 12, o => { Set(o); o.Resume = true; }));
        using var _2 = m2;
        m2.LossOverride = loss => loss * double.NaN;
        var steps = new List<long>();
        rest.StepCompleted += m => steps.Add(m.Step);
        Assert.Contains("4 consecutive", Assert.Throws<TrainingException>(() => rest.Train(Data())).Message);
        Assert.Equal([6L], steps); // steps 6 and 7 are the 3rd and 4th: the exception comes in step 7, before its event
    }
}
