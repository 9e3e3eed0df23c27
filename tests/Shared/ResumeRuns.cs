using LoRAHub.Models.Llama;
using LoRAHub.Training;
using LoRAHub.Training.Data;
using LoRAHub.Training.Checkpoints;

namespace LoRAHub.Tests.Shared;

/// <summary>
/// Resume checks for methods with training state of their own: a tiny Llama trained 12 steps (batch 4) from one seed, into
/// a folder; stopped after a step, or resumed from the folder's checkpoint.
/// </summary>
public static class ResumeRuns
{
    public const long Steps = 12;

    public static TrainResult Run(string outputDir, Func<LlamaForCausalLM, IAdapter> attach, long? stopAt = null, bool resume = false)
    {
        using var model = LlamaForCausalLM.CreateRandom(new LlamaConfig
        {
            VocabSize = 64, HiddenSize = 32, IntermediateSize = 64, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
            MaxPositionEmbeddings = 32, RmsNormEps = 1e-6,
        }, ScalarType.Float32, CPU, seed: 2);
        using var adapter = attach(model);
        var trainer = new Trainer(model, adapter, new TrainerOptions
        {
            OutputDir = outputDir, MaxSteps = Steps, BatchSize = 4, LearningRate = 2e-2, WarmupSteps = 0, Seed = 3,
            ShowProgress = false, LogEvery = 0, Resume = resume,
        });
        using var stop = new CancellationTokenSource();
        trainer.StepCompleted += m => { if (m.Step == stopAt) stop.Cancel(); };
        return trainer.Train(Data(), cancellation: stop.Token);
    }

    /// <summary>
    /// The uninterrupted run and one stopped at <paramref name="stopAt"/> and resumed: the same losses and the same final
    /// trainable tensors, bit for bit (the tensors catch what moves the loss by less than a float's last bit).
    /// </summary>
    public static void AssertResumesExactly(string dir, Func<LlamaForCausalLM, IAdapter> attach, long stopAt)
    {
        var expected = Run(Path.Combine(dir, "full"), attach);
        Assert.True(Run(Path.Combine(dir, "resumed"), attach, stopAt).Stopped);
        var resumed = Run(Path.Combine(dir, "resumed"), attach, resume: true);
        Assert.Equal(expected.Losses.Count, resumed.Losses.Count);
        for (var i = 0; i < expected.Losses.Count; i++)
            Assert.True(expected.Losses[i] == resumed.Losses[i],
                $"step {i + 1}: {expected.Losses[i]} uninterrupted, {resumed.Losses[i]} resumed from step {stopAt}");
        using var scope = NewDisposeScope();
        var (a, b) = (Trained(expected), Trained(resumed));
        Assert.Equal(a.Keys.Order(), b.Keys.Order());
        foreach (var (name, t) in a) Assert.True(t.Equals(b[name]), $"{name} differs after resuming from step {stopAt}");
    }

    private static Dictionary<string, Tensor> Trained(TrainResult run) =>
        torchx.load_safetensors(Path.Combine(run.LastCheckpoint!, CheckpointManager.TrainableFile));

    private static TextDataset Data()
    {
        var rng = new Random(5);
        return new TextDataset(Enumerable.Range(0, 48).Select(_ =>
        {
            var ids = Enumerable.Range(0, 12).Select(_ => rng.Next(1, 64)).ToArray();
            return new TokenizedExample(ids, ids);
        }).ToList());
    }
}
