namespace LoRAHub.Training.Tests;

/// <summary>
/// The loss of a step is the mean over all of its target tokens (every micro-batch, and with several ranks every rank),
/// not a mean of per-batch means: so accumulating two batches of b rows of unequal masked lengths gives the update of
/// one batch of 2b rows (the same property makes 2 ranks × b equal 1 rank × 2b; see LoRAHub.Distributed.Tests).
/// </summary>
[Collection(GlobalRngCollection.Name)]
public sealed class GlobalTokenNormalisationTests : IDisposable
{
    private readonly string dir = Path.Combine(Path.GetTempPath(), "lorahub-gtn-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
    }

    private static TextDataset UnequalRows()
    {
        var rng = new Random(9);
        var rows = new List<TokenizedExample>();
        for (var i = 0; i < 40; i++)
        {
            var length = rng.Next(4, 16);
            var prompt = rng.Next(1, length - 2);
            var ids = Enumerable.Range(0, length).Select(_ => rng.Next(2, 30)).ToArray();
            rows.Add(new TokenizedExample(ids, ids.Select((t, j) => j < prompt ? -100 : t).ToArray()));
        }
        return new TextDataset(rows);
    }

    private double[] Curve(string name, int batch, int accumulation)
    {
        using var model = new TinyLanguageModel(32, dropout: 0);
        var trainer = new Trainer(model, new FullFineTune(model), new TrainerOptions
        {
            OutputDir = Path.Combine(dir, name), MaxSteps = 6, BatchSize = batch, GradientAccumulationSteps = accumulation, LearningRate = 5e-2,
            WarmupSteps = 0, Schedule = LearningRateSchedule.Constant, ShowProgress = false, LogEvery = 0, Seed = 4,
        });
        return trainer.Train(UnequalRows()).Losses.ToArray();
    }

    [Fact]
    public void Two_accumulated_batches_of_b_equal_one_batch_of_2b()
    {
        var whole = Curve("whole", batch: 6, accumulation: 1);
        var accumulated = Curve("accumulated", batch: 3, accumulation: 2);
        Assert.True(whole.Distinct().Count() > 1);
        for (var i = 0; i < whole.Length; i++)
            Assert.True(Math.Abs(whole[i] - accumulated[i]) <= 1e-5 * whole[i], $"step {i + 1}: {whole[i]} vs {accumulated[i]}");
    }
}
