using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Training.Checkpoints;

/// <summary>
/// Writes checkpoints atomically: each is built in a hidden temp folder and renamed into place, so a process killed
/// mid-write leaves the previous checkpoint intact and loadable. Keeps the newest K.
/// </summary>
public sealed class CheckpointManager(string outputDir, int keepLast)
{
    public const string TrainableFile = "trainable.safetensors";
    public const string OptimizerFile = "optimizer.safetensors";
    public const string StateFile = "trainer_state.json";
    public const string AdapterFolder = "adapter";
    private const string Prefix = "checkpoint-";

    private static readonly JsonSerializerOptions Json = new() { WriteIndented = true };

    public string OutputDir { get; } = outputDir;

    public string Save(long step, IReadOnlyDictionary<string, Tensor> trainable, Optimizer optimizer, TrainerState state, IAdapter? adapter)
    {
        Directory.CreateDirectory(OutputDir);
        var final = Path.Combine(OutputDir, $"{Prefix}{step:D6}");
        var temp = Path.Combine(OutputDir, $".{Prefix}{step:D6}.partial-{Guid.NewGuid():N}");
        try
        {
            Directory.CreateDirectory(temp);
            torchx.save_safetensors(trainable, Path.Combine(temp, TrainableFile));
            torchx.save_safetensors(optimizer.state_tensors(), Path.Combine(temp, OptimizerFile));
            adapter?.Save(Path.Combine(temp, AdapterFolder));
            File.WriteAllText(Path.Combine(temp, StateFile), JsonSerializer.Serialize(state, Json));
            if (Directory.Exists(final))
            {
                var old = final + $".old-{Guid.NewGuid():N}";
                Directory.Move(final, old);
                Directory.Move(temp, final);
                Directory.Delete(old, recursive: true);
            }
            else
            {
                Directory.Move(temp, final);
            }
        }
        catch
        {
            if (Directory.Exists(temp)) Directory.Delete(temp, recursive: true);
            throw;
        }
        Prune();
        return final;
    }

    /// <summary>Complete checkpoints, oldest first.</summary>
    public IReadOnlyList<string> List()
    {
        if (!Directory.Exists(OutputDir)) return [];
        return Directory.GetDirectories(OutputDir, Prefix + "*")
            .Where(d => long.TryParse(Path.GetFileName(d)[Prefix.Length..], out _) && File.Exists(Path.Combine(d, StateFile)))
            .OrderBy(d => long.Parse(Path.GetFileName(d)[Prefix.Length..]))
            .ToList();
    }

    public string? Latest() => List().LastOrDefault();

    private void Prune()
    {
        foreach (var stale in Directory.GetDirectories(OutputDir, $".{Prefix}*.partial-*")) TryDelete(stale);
        var all = List();
        for (var i = 0; i < all.Count - keepLast; i++) TryDelete(all[i]);
    }

    private static void TryDelete(string dir)
    {
        try { Directory.Delete(dir, recursive: true); }
        catch (IOException) { }
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

    /// <summary>Copies a checkpoint's trainable parameters and optimizer state into the live ones.</summary>
    public static void Restore(string checkpoint, IReadOnlyDictionary<string, Tensor> trainable, Optimizer optimizer)
    {
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
