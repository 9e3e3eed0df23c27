using System.Runtime.InteropServices;

namespace LoRAHub.Training.Tests;

/// <summary>End-to-end trainer behaviour on a tiny model: learning, determinism, resume, NaN handling, checkpoints.</summary>
[Collection(GlobalRngCollection.Name)]
public class TrainerTests : IDisposable
{
    private readonly string dir = Path.Combine(Path.GetTempPath(), "lorahub-trainer-" + Guid.NewGuid().ToString("N"));
    private static readonly CharTokenizer Tok = TrainingData.Tok;

    public void Dispose()
    {
        if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
    }

    private static TextDataset Data() => TrainingData.ShiftByOne();

    private TrainerOptions Options(string name, long steps = 30) => new()
    {
        OutputDir = Path.Combine(dir, name), MaxSteps = steps, BatchSize = 8, LearningRate = 1e-2, WarmupSteps = 2,
        SaveEvery = 10, ShowProgress = false, LogEvery = 0, Seed = 7,
    };

    private static (TinyLanguageModel model, Trainer trainer) Make(TrainerOptions options, List<string>? log = null)
    {
        var model = new TinyLanguageModel(Tok.VocabSize);
        var trainer = new Trainer(model, new FullFineTune(model), options, s => log?.Add(s));
        return (model, trainer);
    }

    [Fact]
    public void Loss_falls_and_files_are_written()
    {
        var (model, trainer) = Make(Options("falls", 40));
        using var _ = model;
        var (train, eval) = Data().Split(0.25, 1);
        var before = trainer.Evaluate(eval).Loss;
        var result = trainer.Train(train, eval);
        Assert.True(result.FinalEvalLoss < before * 0.9, $"eval loss {before} → {result.FinalEvalLoss}");
        Assert.True(result.Losses.TakeLast(5).Average() < result.Losses.Take(5).Average());
        Assert.True(File.Exists(result.MetricsFile));
        Assert.Equal(40, File.ReadAllLines(result.MetricsFile).Length);
        Assert.Contains("<svg", File.ReadAllText(result.PlotFile));
        Assert.Equal(2, Directory.GetDirectories(result.OutputDir, "checkpoint-*").Length); // keep last 2 of 4
        Assert.EndsWith("checkpoint-000040", result.LastCheckpoint);
    }

    [Fact]
    public void Same_seed_gives_the_same_losses()
    {
        var (m1, t1) = Make(Options("seed-a", 12));
        var (m2, t2) = Make(Options("seed-b", 12));
        using var _1 = m1;
        using var _2 = m2;
        var a = t1.Train(Data()).Losses;
        var b = t2.Train(Data()).Losses;
        Assert.Equal(a, b);
    }

    [Fact]
    public void Resume_reproduces_the_uninterrupted_curve()
    {
        var (m1, full) = Make(Options("uninterrupted", 20));
        using var _1 = m1;
        var expected = full.Train(Data()).Losses;

        // The same run stopped after step 7 (cancellation writes a checkpoint), then a fresh trainer resumes it.
        var first = Options("resumed", 20);
        var (m2, part) = Make(first);
        using var _2 = m2;
        using var stop = new CancellationTokenSource();
        part.StepCompleted += m => { if (m.Step == 7) stop.Cancel(); };
        var stopped = part.Train(Data(), cancellation: stop.Token);
        // A token of the caller's own: Train returns (no exception), marked stopped.
        Assert.Equal((7L, true), (stopped.Steps, stopped.Stopped));
        var second = Options("resumed", 20);
        second.Resume = true;
        var (m3, rest) = Make(second);
        using var _3 = m3;
        var resumed = rest.Train(Data()).Losses;
        Assert.Equal(expected.Count, resumed.Count);
        for (var i = 0; i < expected.Count; i++) Assert.Equal(expected[i], resumed[i], 5);
    }

    [Fact]
    public void A_resumed_run_logs_each_step_once()
    {
        var first = Options("metrics-resume", 12);
        var (m1, part) = Make(first);
        using var _1 = m1;
        using var stop = new CancellationTokenSource();
        part.StepCompleted += m => { if (m.Step == 5) stop.Cancel(); };
        var metricsFile = part.Train(Data(), cancellation: stop.Token).MetricsFile;
        // A crash after steps 6 and 7 were logged but before their checkpoint (the last line torn): the resumed run
        // computes 6 and 7 again, so those records must not stay beside the new ones.
        var lines = File.ReadAllLines(metricsFile);
        File.AppendAllLines(metricsFile, [lines[^1].Replace("\"step\":5", "\"step\":6"), lines[^1].Replace("\"step\":5", "\"step\":7")[..20]]);
        var second = Options("metrics-resume", 12);
        second.Resume = true;
        var (m2, rest) = Make(second);
        using var _2 = m2;
        rest.Train(Data());
        var steps = File.ReadAllLines(metricsFile).Select(l => System.Text.Json.JsonDocument.Parse(l).RootElement.GetProperty("step").GetInt64());
        Assert.Equal(Enumerable.Range(1, 12).Select(i => (long)i), steps);
    }

    private static Dictionary<string, byte[]> Files(string folder) =>
        Directory.GetFiles(folder, "*", SearchOption.AllDirectories).ToDictionary(f => Path.GetRelativePath(folder, f), File.ReadAllBytes);

    [Fact]
    public void A_fresh_run_into_an_earlier_runs_folder_is_refused_and_leaves_its_files_alone()
    {
        var (m1, first) = Make(Options("earlier", 20));
        using var _1 = m1;
        first.Train(Data());
        var before = Files(Path.Combine(dir, "earlier"));

        var (m2, again) = Make(Options("earlier", 20));
        using var _2 = m2;
        var steps = 0;
        again.StepCompleted += _ => steps++;
        var e = Assert.Throws<TrainingException>(() => again.Train(Data()));

        Assert.Equal($"{Path.Combine(dir, "earlier")} holds checkpoints of an earlier run (up to step 20); set Resume = true to continue it, " +
                     "Overwrite = true to start over (deletes them), or choose another OutputDir", e.Message);
        Assert.Equal(0, steps);
        var after = Files(Path.Combine(dir, "earlier"));
        Assert.Equal(before.Keys.Order(), after.Keys.Order());
        foreach (var (name, bytes) in before) Assert.True(bytes.AsSpan().SequenceEqual(after[name]), $"{name} changed");

        // Only the metrics of a run that saved no checkpoint are kept too.
        foreach (var checkpoint in Directory.GetDirectories(Path.Combine(dir, "earlier"), "checkpoint-*")) Directory.Delete(checkpoint, recursive: true);
        var (m3, third) = Make(Options("earlier", 20));
        using var _3 = m3;
        Assert.Contains("holds the metrics.jsonl of an earlier run; set Overwrite = true", Assert.Throws<TrainingException>(() => third.Train(Data())).Message);
        Assert.Equal(20, File.ReadAllLines(Path.Combine(dir, "earlier", "metrics.jsonl")).Length);
    }

    [Fact]
    public void Overwrite_starts_the_run_over_and_says_what_it_deleted()
    {
        var (m1, first) = Make(Options("overwritten", 30));
        using var _1 = m1;
        first.Train(Data());
        Assert.Equal(2, Directory.GetDirectories(Path.Combine(dir, "overwritten"), "checkpoint-*").Length);

        var options = Options("overwritten", 10);
        options.Overwrite = true;
        var log = new List<string>();
        var (m2, again) = Make(options, log);
        using var _2 = m2;
        var result = again.Train(Data());

        Assert.Contains($"overwrite: deleted 2 checkpoints of an earlier run in {options.OutputDir}", log);
        Assert.Equal(["checkpoint-000010"], Directory.GetDirectories(options.OutputDir, "checkpoint-*").Select(Path.GetFileName));
        Assert.Equal(10, File.ReadAllLines(result.MetricsFile).Length);
        Assert.Equal(10, Checkpoints.CheckpointManager.ReadState(result.LastCheckpoint!).Step);
    }

    [Fact]
    public void Non_finite_losses_are_skipped_then_stop_the_run()
    {
        var log = new List<string>();
        var options = Options("nan", 12);
        var (model, trainer) = Make(options, log);
        using var _ = model;
        var calls = 0;
        model.LossOverride = loss => ++calls == 3 ? loss * double.NaN : loss;
        var result = trainer.Train(Data());
        Assert.Equal(1, result.SkippedSteps);
        Assert.Contains(log, l => l.Contains("non-finite"));

        var (model2, trainer2) = Make(Options("nan-stop", 12));
        using var _2 = model2;
        model2.LossOverride = loss => loss * double.PositiveInfinity;
        var e = Assert.Throws<TrainingException>(() => trainer2.Train(Data()));
        Assert.Contains("consecutive", e.Message);
    }

    [Fact]
    public void Killed_checkpoint_write_leaves_the_previous_checkpoint_loadable()
    {
        var options = Options("atomic", 10);
        var (model, trainer) = Make(options);
        using var _ = model;
        trainer.Train(Data());
        var manager = new Checkpoints.CheckpointManager(options.OutputDir, 2);
        var good = manager.Latest()!;
        // A writer killed mid-way leaves only a hidden partial folder behind.
        var partial = Path.Combine(options.OutputDir, ".checkpoint-000020.partial-dead");
        Directory.CreateDirectory(partial);
        File.WriteAllBytes(Path.Combine(partial, "trainable.safetensors"), new byte[10]);
        Assert.Equal(good, manager.Latest());
        var resume = Options("atomic", 12);
        resume.Resume = true;
        var (model2, trainer2) = Make(resume);
        using var _2 = model2;
        Assert.Equal(12, trainer2.Train(Data()).Steps);
        Assert.False(Directory.Exists(partial)); // cleaned on the next save
    }

    [Fact]
    public void Corrupt_checkpoint_state_names_the_file()
    {
        var options = Options("corrupt", 10);
        var (model, trainer) = Make(options);
        using var _ = model;
        trainer.Train(Data());
        var latest = new Checkpoints.CheckpointManager(options.OutputDir, 2).Latest()!;
        File.WriteAllText(Path.Combine(latest, "trainer_state.json"), "{not json");
        var resume = Options("corrupt", 12);
        resume.Resume = true;
        var (model2, trainer2) = Make(resume);
        using var _2 = model2;
        var e = Assert.Throws<TrainingException>(() => trainer2.Train(Data()));
        Assert.Contains("trainer_state.json", e.Message);
    }

    [Fact]
    public void Out_of_memory_says_what_to_reduce_and_where_to_resume()
    {
        var options = Options("oom", 20);
        var (model, trainer) = Make(options);
        using var _ = model;
        // TorchSharp raises libtorch's errors as ExternalException; this is the CUDA allocator's message.
        var calls = 0;
        model.LossOverride = loss => ++calls == 13
            ? throw new ExternalException("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB")
            : loss;
        var e = Assert.Throws<TrainingException>(() => trainer.Train(Data()));
        Assert.IsType<OutOfMemoryTorchException>(e.InnerException);
        Assert.Contains("step 13", e.Message);
        Assert.Contains("BatchSize", e.Message);
        Assert.Contains("sequence length", e.Message);
        Assert.Contains("GradientCheckpointing", e.Message);
        Assert.Contains("checkpoint-000010", e.Message);
        Assert.Contains("Resume", e.Message);
        Assert.Contains("Tried to allocate 20.00 GiB", e.Message);

        var resume = Options("oom", 20);
        resume.Resume = true;
        var (model2, trainer2) = Make(resume);
        using var _2 = model2;
        Assert.Equal(20, trainer2.Train(Data()).Steps);
    }

    [Fact]
    public void A_libtorch_error_in_a_step_is_a_typed_exception_with_its_message()
    {
        var (model, trainer) = Make(Options("shape", 5));
        using var _ = model;
        // mm, not matmul: TorchSharp 0.107's native matmul lets the C++ exception escape and the process aborts.
        model.LossOverride = loss => loss + torch.ones(2, 3).mm(torch.ones(4, 5)).sum();
        var e = Assert.Throws<TorchException>(() => trainer.Train(Data()));
        Assert.IsNotType<OutOfMemoryTorchException>(e);
        Assert.Contains("cannot be multiplied", e.Message);
        Assert.DoesNotContain("Exception raised from", e.Message);
    }

    [Fact]
    public void Cuda_training_with_dropout_resumes_exactly_and_reports_peak_memory()
    {
        if (!torch.cuda.is_available()) return;
        (TinyLanguageModel, Trainer) OnCuda(TrainerOptions o)
        {
            var model = new TinyLanguageModel(Tok.VocabSize);
            model.to(torch.CUDA);
            return (model, new Trainer(model, new FullFineTune(model), o));
        }
        var (m1, full) = OnCuda(Options("cuda-full", 12));
        using var _1 = m1;
        var expected = full.Train(Data());
        Assert.True(expected.PeakGpuMemoryBytes > 0);

        var (m2, part) = OnCuda(Options("cuda-resumed", 12));
        using var _2 = m2;
        using var stop = new CancellationTokenSource();
        part.StepCompleted += m => { if (m.Step == 5) stop.Cancel(); };
        Assert.Equal(5, part.Train(Data(), cancellation: stop.Token).Steps);
        var second = Options("cuda-resumed", 12);
        second.Resume = true;
        var (m3, rest) = OnCuda(second);
        using var _3 = m3;
        var resumed = rest.Train(Data()).Losses;
        Assert.Equal(expected.Losses.Count, resumed.Count);
        for (var i = 0; i < resumed.Count; i++) Assert.Equal(expected.Losses[i], resumed[i], 5);
    }

    [Fact]
    public void Bad_options_are_rejected_with_the_option_name()
    {
        var e = Assert.Throws<ArgumentException>(() => new Trainer(new TinyLanguageModel(8), new FullFineTune(new TinyLanguageModel(8)), new TrainerOptions { BatchSize = 0 }));
        Assert.Contains("BatchSize", e.Message);
    }
}
