using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.Safetensors;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Training.Checkpoints;

/// <summary>
/// Writes checkpoints so that a crash at any moment leaves the newest complete one loadable. Each is built in a hidden
/// temp folder: tensors, adapter and trainer_state.json (each file written and synced atomically), then checkpoint.json
/// (sizes and SHA-256 of every file) last; the folder is synced and renamed into place in one step, and only then are
/// older checkpoints removed (keeping the newest K). Resume takes the newest folder that matches its manifest, so a
/// torn or damaged checkpoint is passed over, never loaded. docs/reliability.md has the crash tests behind this.
/// </summary>
public sealed class CheckpointManager(string outputDir, int keepLast)
{
    public const string TrainableFile = "trainable.safetensors";
    public const string OptimizerFile = "optimizer.safetensors";
    public const string StateFile = "trainer_state.json";
    public const string AdapterFolder = "adapter";
    /// <summary>The adapter's training state outside its tensors and the optimizer (<see cref="IAdapter.TrainingState"/>), when it has any.</summary>
    public const string TrainingStateFile = "adapter_training_state.safetensors";
    public const string ManifestFile = CheckpointManifest.FileName;
    private const string Prefix = "checkpoint-";

    private static readonly JsonSerializerOptions Json = new() { WriteIndented = true };

    public string OutputDir { get; } = outputDir;

    /// <summary>Checkpoints that resume passed over, with the reason (for the trainer's log).</summary>
    public IReadOnlyList<string> Skipped => skipped;
    private readonly List<string> skipped = [];

    public string Save(long step, IReadOnlyDictionary<string, Tensor> trainable, Optimizer optimizer, TrainerState state, IAdapter? adapter)
    {
        // Crash tests aim at the numbered writes of this scope (LORAHUB_FAULT_AT); a no-op otherwise.
        using var faults = WriteFaults.Scope(step);
        Directory.CreateDirectory(OutputDir);
        var name = $"{Prefix}{step:D6}";
        var final = Path.Combine(OutputDir, name);
        var temp = Path.Combine(OutputDir, $".{name}.partial-{Guid.NewGuid():N}");
        string? replaced = null;
        try
        {
            Directory.CreateDirectory(temp);
            torchx.save_safetensors(trainable, Path.Combine(temp, TrainableFile));
            torchx.save_safetensors(optimizer.state_tensors(), Path.Combine(temp, OptimizerFile));
            adapter?.Save(Path.Combine(temp, AdapterFolder));
            if (adapter?.TrainingState() is { Count: > 0 } training) torchx.save_safetensors(training, Path.Combine(temp, TrainingStateFile));
            var stateBytes = JsonSerializer.SerializeToUtf8Bytes(state, Json);
            AtomicFile.Write(Path.Combine(temp, StateFile), stream => stream.Write(stateBytes));
            CheckpointManifest.Write(temp, step);
            // Files written by others (an adapter's Save) may not be synced: sync the whole tree before it gets its name.
            Durable.SyncTree(temp);
            if (Directory.Exists(final))
            {
                // The same step saved again (a resumed run stopped where it started): the old copy stays, hidden, until the
                // new one has its name; Latest() restores it if a crash falls in between.
                replaced = Path.Combine(OutputDir, $".{name}.replaced-{Guid.NewGuid():N}");
                WriteFaults.Point("set-aside");
                Directory.Move(final, replaced);
            }
            WriteFaults.Point("commit");
            Directory.Move(temp, final);
            Durable.SyncDirectory(OutputDir);
        }
        catch (Exception e)
        {
            TryDelete(temp);
            if (replaced != null && !Directory.Exists(final) && Directory.Exists(replaced)) Directory.Move(replaced, final);
            if (e is not (IOException or UnauthorizedAccessException)) throw;
            // Disk full, quota, permissions: nothing of this checkpoint is left, the earlier ones are untouched.
            var previous = List().LastOrDefault(d => d != final);
            throw new TrainingException(
                $"cannot write checkpoint {final}: {e.Message}. " +
                (previous != null ? $"The previous checkpoint {previous} is intact; " : "No earlier checkpoint exists; ") +
                "free disk space (or point OutputDir elsewhere) and resume with Resume = true.", e);
        }
        if (replaced != null) TryDelete(replaced);
        Prune(step);
        return final;
    }

    /// <summary>Checkpoint folders by name, oldest first: complete ones, and any torn one a crash left under its final name.</summary>
    public IReadOnlyList<string> List()
    {
        if (!Directory.Exists(OutputDir)) return [];
        return Directory.GetDirectories(OutputDir, Prefix + "*")
            .Where(d => StepOf(d) is not null && (File.Exists(Path.Combine(d, ManifestFile)) || IsLegacyComplete(d)))
            .OrderBy(d => StepOf(d))
            .ToList();
    }

    /// <summary>
    /// The newest checkpoint that matches its manifest (sizes and SHA-256 of every file), or null. Checkpoints written
    /// before manifests existed count when their three files are there. Damaged newer ones are skipped (listed in
    /// Skipped); when checkpoints exist but none is intact, resuming fails with what is wrong rather than starting over.
    /// </summary>
    public string? Latest()
    {
        RecoverSetAside();
        skipped.Clear();
        foreach (var candidate in List().Reverse())
        {
            var problem = File.Exists(Path.Combine(candidate, ManifestFile)) ? CheckpointManifest.Verify(candidate) : null;
            if (problem == null) return candidate;
            skipped.Add($"{candidate}: {problem}");
        }
        if (skipped.Count > 0)
            throw new TrainingException($"no intact checkpoint to resume from in {OutputDir}: {string.Join("; ", skipped)}. " +
                "The files changed after they were written (disk error, manual edit); restore them, or delete those folders to train from the start.");
        return null;
    }

    /// <summary>The step a checkpoint folder (checkpoint-000040) was saved at; null for another name.</summary>
    public static long? StepOf(string dir) =>
        long.TryParse(Path.GetFileName(dir)[Prefix.Length..], out var step) ? step : null;

    private static bool IsLegacyComplete(string dir) =>
        File.Exists(Path.Combine(dir, StateFile)) && File.Exists(Path.Combine(dir, TrainableFile)) && File.Exists(Path.Combine(dir, OptimizerFile));

    /// <summary>A crash between setting a same-step checkpoint aside and renaming its replacement in: put the old one back.</summary>
    private void RecoverSetAside()
    {
        if (!Directory.Exists(OutputDir)) return;
        foreach (var aside in Directory.GetDirectories(OutputDir, $".{Prefix}*.replaced-*"))
        {
            var name = Path.GetFileName(aside)[1..];
            var final = Path.Combine(OutputDir, name[..name.IndexOf(".replaced-", StringComparison.Ordinal)]);
            if (!Directory.Exists(final)) Directory.Move(aside, final);
            else TryDelete(aside);
        }
    }

    // Keeps the newest keepLast up to the step just saved. Later steps are left alone: they exist only when a resume fell
    // back past them (damaged), and counting them could delete the checkpoint just written; this run replaces each
    // when it saves that step again.
    private void Prune(long saved)
    {
        foreach (var stale in Directory.GetDirectories(OutputDir, $".{Prefix}*.partial-*")) TryDelete(stale);
        foreach (var stale in Directory.GetDirectories(OutputDir, $".{Prefix}*.deleting-*")) TryDelete(stale);
        var all = List().Where(d => StepOf(d) <= saved).ToList();
        for (var i = 0; i < all.Count - keepLast; i++)
        {
            // Renamed out of the list first, in one step: a crash during the recursive delete leaves a hidden folder,
            // never a half-deleted checkpoint under its real name.
            var doomed = Path.Combine(OutputDir, $".{Path.GetFileName(all[i])}.deleting-{Guid.NewGuid():N}");
            try
            {
                WriteFaults.Point("prune");
                Directory.Move(all[i], doomed);
            }
            catch (IOException) { continue; }
            TryDelete(doomed);
        }
    }

    private static void TryDelete(string dir)
    {
        try { Directory.Delete(dir, recursive: true); }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
    }

    public static TrainerState ReadState(string checkpoint)
    {
        var path = Path.Combine(checkpoint, StateFile);
        try
        {
            return JsonSerializer.Deserialize<TrainerState>(File.ReadAllText(path)) ?? throw new JsonException("empty state");
        }
        catch (Exception e) when (e is JsonException or IOException)
        {
            throw new TrainingException($"checkpoint state {path} is unreadable ({e.Message}); delete that checkpoint folder to resume from an earlier one", e);
        }
    }

    /// <summary>
    /// Copies a checkpoint's trainable parameters and optimizer state into the live ones, and hands the adapter its
    /// training state (<see cref="IAdapter.TrainingState"/>; an empty set where the checkpoint has none).
    /// </summary>
    public static void Restore(string checkpoint, IReadOnlyDictionary<string, Tensor> trainable, Optimizer optimizer, IAdapter? adapter = null)
    {
        if (adapter is not null)
        {
            var file = Path.Combine(checkpoint, TrainingStateFile);
            try
            {
                using var scope = torch.NewDisposeScope();
                adapter.LoadTrainingState(File.Exists(file) ? torchx.load_safetensors(file) : new Dictionary<string, Tensor>());
            }
            catch (Exception e) when (e is not TrainingException)
            {
                throw new TrainingException($"cannot restore {adapter.Method.Name}'s training state from {file}: {e.Message}", e);
            }
        }
        Dictionary<string, Tensor> saved;
        try
        {
            saved = torchx.load_safetensors(Path.Combine(checkpoint, TrainableFile));
        }
        catch (Exception e) when (e is not TrainingException)
        {
            throw new TrainingException($"cannot read {Path.Combine(checkpoint, TrainableFile)}: {e.Message}", e);
        }
        try
        {
            using (torch.no_grad())
            {
                foreach (var (name, target) in trainable)
                {
                    if (!saved.TryGetValue(name, out var value))
                        throw new TrainingException($"checkpoint {checkpoint} has no tensor '{name}'; it was written for a different method or options");
                    if (!value.shape.SequenceEqual(target.shape))
                        throw new TrainingException($"checkpoint tensor '{name}' has shape [{string.Join(", ", value.shape)}] but the model has [{string.Join(", ", target.shape)}]");
                    target.copy_(value);
                }
            }
            var optimizerState = torchx.load_safetensors(Path.Combine(checkpoint, OptimizerFile));
            try { optimizer.load_state_tensors(optimizerState); }
            catch (InvalidOperationException e)
            {
                throw new TrainingException($"cannot restore the optimizer from {checkpoint}: {e.Message}", e);
            }
            finally { foreach (var t in optimizerState.Values) t.Dispose(); }
        }
        finally
        {
            foreach (var t in saved.Values) t.Dispose();
        }
    }
}
