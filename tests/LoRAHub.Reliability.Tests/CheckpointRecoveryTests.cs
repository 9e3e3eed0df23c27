using LoRAHub.Safetensors;
using LoRAHub.Training.Checkpoints;

namespace LoRAHub.Reliability.Tests;

/// <summary>
/// What resume does with checkpoints that a crash or the disk damaged: a damaged newest one is passed over for an
/// intact older one; none intact is an error naming the problem (never a silent restart); a same-step checkpoint set
/// aside by a save that crashed before its replacement got its name is put back.
/// </summary>
[Collection(Serial.Name)]
public sealed class CheckpointRecoveryTests
{
    private static string TrainThree(TempFolder temp)
    {
        var dir = temp["run"];
        using var model = TrainChild.TinyModel();
        using var adapter = TrainChild.AttachLora(model);
        new Trainer(model, adapter, new TrainerOptions
        {
            OutputDir = dir, MaxSteps = 3, BatchSize = 4, SaveEvery = 1, KeepLastCheckpoints = 3, Seed = 3, ShowProgress = false, LogEvery = 0,
        }).Train(TrainChild.Data(64));
        return dir;
    }

    [Fact]
    public void A_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one()
    {
        using var temp = new TempFolder("recover-damaged");
        var dir = TrainThree(temp);
        var optimizer = Path.Combine(dir, "checkpoint-000003", CheckpointManager.OptimizerFile);
        var bytes = File.ReadAllBytes(optimizer);
        bytes[^1] ^= 1; // one bit of optimizer state: the safetensors reader cannot see it, the manifest's hash does
        File.WriteAllBytes(optimizer, bytes);
        var manager = new CheckpointManager(dir, 3);
        Assert.EndsWith("checkpoint-000002", manager.Latest());
        Assert.Contains(manager.Skipped, s => s.Contains("optimizer.safetensors does not match its SHA-256"));
    }

    [Fact]
    public void No_intact_checkpoint_is_an_error_that_says_what_is_wrong()
    {
        using var temp = new TempFolder("recover-none");
        var dir = TrainThree(temp);
        foreach (var checkpoint in Directory.GetDirectories(dir, "checkpoint-*"))
            File.Delete(Path.Combine(checkpoint, "adapter", "adapter_config.json"));
        var e = Assert.Throws<TrainingException>(() => new CheckpointManager(dir, 3).Latest());
        Assert.Contains("adapter/adapter_config.json is missing", e.Message);
        Assert.Contains("no intact checkpoint", e.Message);
    }

    [Fact]
    public void A_checkpoint_set_aside_by_a_crashed_save_is_put_back()
    {
        using var temp = new TempFolder("recover-aside");
        var dir = TrainThree(temp);
        // The crash fell between "move checkpoint-3 aside" and "rename its replacement in".
        Directory.Move(Path.Combine(dir, "checkpoint-000003"), Path.Combine(dir, ".checkpoint-000003.replaced-0123"));
        Assert.EndsWith("checkpoint-000003", new CheckpointManager(dir, 3).Latest());
        Assert.Null(CheckpointManifest.Verify(Path.Combine(dir, "checkpoint-000003")));
    }

    [Fact]
    public void A_failed_same_step_replacement_restores_the_old_checkpoint()
    {
        using var temp = new TempFolder("recover-replace");
        var dir = TrainThree(temp);
        var before = CheckpointManifest.Verify(Path.Combine(dir, "checkpoint-000003"));
        Assert.Null(before);
        var manifest = File.ReadAllText(Path.Combine(dir, "checkpoint-000003", CheckpointManager.ManifestFile));
        // Save step 3 again with the disk "full" at the rename: the old checkpoint-3 must come back unchanged.
        using var model = TrainChild.TinyModel();
        using var adapter = TrainChild.AttachLora(model);
        var trainable = model.Root.named_parameters().Where(p => p.parameter.requires_grad).ToDictionary(p => p.name, p => (Tensor)p.parameter);
        using var optimizer = new LoRAHub.TorchExtensions.Optim.AdamW(adapter.ParameterGroups(1e-3, 0));
        using (WriteFaults.Inject("3:8:0:enospc"))
        {
            var e = Assert.Throws<TrainingException>(() => new CheckpointManager(dir, 3).Save(3, trainable, optimizer, new TrainerState { Step = 3 }, adapter));
            Assert.Contains("No space left on device", e.Message);
        }
        Assert.Equal(manifest, File.ReadAllText(Path.Combine(dir, "checkpoint-000003", CheckpointManager.ManifestFile)));
        Assert.Empty(Directory.GetDirectories(dir, ".checkpoint-*"));
    }
}
