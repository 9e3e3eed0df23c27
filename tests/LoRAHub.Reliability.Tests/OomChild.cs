using System.Globalization;

namespace LoRAHub.Reliability.Tests;

/// <summary>
/// The CUDA out-of-memory case for the GPU machine (gpu/oom.sh runs it): in one process, train the big model with a
/// small batch and checkpoints; then ask for a batch that cannot fit, which must fail with a TrainingException saying
/// what to reduce and naming the last checkpoint; then, in the same process, resume from that checkpoint with the small
/// batch and finish. Prints "check ok|FAIL ..." lines and exits 1 if any check failed.
/// <code>oom-child &lt;dir&gt; [device=cuda] [huge-batch=N] [steps=N]</code>
/// </summary>
public static class OomChild
{
    public const string Verb = "oom-child";

    public static int Run(string[] args)
    {
        var dir = args[0];
        string? Flag(string name) => args.Skip(1).FirstOrDefault(f => f.StartsWith(name + "=", StringComparison.Ordinal))?[(name.Length + 1)..];
        var device = torch.device(Flag("device") ?? "cuda");
        var huge = int.Parse(Flag("huge-batch") ?? "4096", CultureInfo.InvariantCulture);
        var steps = long.Parse(Flag("steps") ?? "10", CultureInfo.InvariantCulture);
        var failed = 0;
        void Check(bool ok, string what)
        {
            Console.Out.WriteLine($"check {(ok ? "ok" : "FAIL")}: {what}");
            if (!ok) failed++;
        }

        using var model = TrainChild.TinyModel(device, big: true);
        using var adapter = TrainChild.AttachLora(model);
        var data = TrainChild.Data(model.Config.VocabSize, count: Math.Max(huge, 64), maxLength: 1024);
        TrainerOptions Options(long maxSteps, int batch, bool resume) => new()
        {
            OutputDir = dir, MaxSteps = maxSteps, BatchSize = batch, LearningRate = 1e-3, SaveEvery = 2, Seed = 3,
            ShowProgress = false, LogEvery = 0, Resume = resume,
        };

        // 1. Six steps with a batch that fits: checkpoints at 2, 4, 6.
        var first = new Trainer(model, adapter, Options(6, 4, resume: false)).Train(data);
        Check(first.Steps == 6, $"trained 6 steps with batch 4 (peak {first.PeakGpuMemoryBytes / 1e9:0.00} GB)");

        // 2. A batch that cannot fit: a managed error that says what to reduce and where to resume.
        try
        {
            new Trainer(model, adapter, Options(steps, huge, resume: true)).Train(data);
            Check(false, $"batch {huge} should not fit on {device}");
        }
        catch (TrainingException e)
        {
            Console.Out.WriteLine("oom-message: " + e.Message.Replace('\n', ' '));
            Check(e.InnerException is OutOfMemoryTorchException, "the cause is OutOfMemoryTorchException");
            Check(e.Message.Contains("BatchSize") && e.Message.Contains("GradientCheckpointing"), "the message says what to reduce");
            Check(e.Message.Contains("checkpoint-000006"), "the message names the last checkpoint");
        }
        if (device.type == DeviceType.CUDA)
            Console.Out.WriteLine($"cuda memory after the failure: allocated {torchx.cuda.memory_allocated(Math.Max(0, device.index)) / 1e9:0.00} GB, " +
                                  $"reserved {torchx.cuda.memory_reserved(Math.Max(0, device.index)) / 1e9:0.00} GB");

        // 3. The same process resumes from the last checkpoint with the small batch and finishes.
        var resumed = new Trainer(model, adapter, Options(steps, 4, resume: true)).Train(data);
        Check(resumed.Steps == steps, $"same process resumed from checkpoint 6 with batch 4 and reached step {resumed.Steps}");
        Console.Out.WriteLine($"losses {string.Join(' ', resumed.Losses.Select(l => l.ToString("R", CultureInfo.InvariantCulture)))}");
        return failed == 0 ? 0 : 1;
    }
}
