using LoRAHub.Models.Llama;
using LoRAHub.TorchExtensions;

namespace LoRAHub.Training.Tests;

/// <summary>
/// The trainer's backward lets custom functions write their parameters' gradients into .grad themselves
/// (<see cref="CustomFunction.AccumulateLeafGradients"/>): full fine-tuning of a tiny Llama (the chunked cross-entropy's
/// head weight, accumulated over micro-batches and added to by the embedding's own gradient) trains to the same losses, bit
/// for bit, as with libtorch accumulating them.
/// </summary>
[Collection(GlobalRngCollection.Name)]
public sealed class LeafGradientTests : IDisposable
{
    private readonly string dir = Directory.CreateTempSubdirectory("lorahub-leaf").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    private static TextDataset Rows()
    {
        var rng = new Random(11);
        return new TextDataset(Enumerable.Range(0, 24).Select(_ =>
        {
            var ids = Enumerable.Range(0, rng.Next(4, 16)).Select(_ => rng.Next(1, 64)).ToArray();
            return new TokenizedExample(ids, ids);
        }).ToList());
    }

    private double[] Train(bool leafGradients, out long writes)
    {
        var was = CustomFunction.LeafGradients;
        CustomFunction.LeafGradients = leafGradients;
        try
        {
            var before = CustomFunction.LeafGradientWrites;
            using var llama = LlamaForCausalLM.CreateRandom(new LlamaConfig
            {
                VocabSize = 64, HiddenSize = 32, IntermediateSize = 64, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
                MaxPositionEmbeddings = 64, RmsNormEps = 1e-6, TieWordEmbeddings = true,
            }, ScalarType.Float32, CPU, seed: 4);
            var losses = new Trainer(llama, new FullFineTune(llama), new TrainerOptions
            {
                OutputDir = Path.Combine(dir, leafGradients ? "on" : "off"), MaxSteps = 4, BatchSize = 4, GradientAccumulationSteps = 2,
                LearningRate = 1e-2, WarmupSteps = 0, Schedule = LearningRateSchedule.Constant, ShowProgress = false, LogEvery = 0, Seed = 5,
            }).Train(Rows()).Losses.ToArray();
            writes = CustomFunction.LeafGradientWrites - before;
            return losses;
        }
        finally
        {
            CustomFunction.LeafGradients = was;
        }
    }

    [Fact]
    public void Full_fine_tuning_with_gradients_written_by_the_functions_matches_libtorchs_accumulation_bit_for_bit()
    {
        var on = Train(leafGradients: true, out var writes);
        var off = Train(leafGradients: false, out var none);
        Assert.True(writes >= 8, $"the functions wrote only {writes} parameter gradients"); // the head, per micro-batch
        Assert.Equal(0, none);
        Assert.True(on.Distinct().Count() > 1);
        Assert.Equal(off, on);
    }
}
