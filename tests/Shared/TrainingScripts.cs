namespace LoRAHub.Tests.Shared;

/// <summary>The .csx scripts the host's Ctrl+C tests run: a tiny full fine-tuning that trains for longer than they wait.</summary>
public static class TrainingScripts
{
    /// <summary>
    /// Builds a one-layer Llama on the CPU and trains it into ScriptDirectory/run; <paramref name="before"/> runs before the
    /// trainer is made, <paramref name="train"/> are the Train call's arguments, and the script says "trained N" after it
    /// (with whether it stopped).
    /// </summary>
    public static string Tiny(string train = "new TextDataset(rows)", string before = "", int maxSteps = 100_000) => $$"""
        using LoRAHub.Models.Llama;
        using LoRAHub.Training.Data;
        var config = new LlamaConfig { VocabSize = 16, HiddenSize = 16, IntermediateSize = 32, NumHiddenLayers = 1, NumAttentionHeads = 2,
            NumKeyValueHeads = 2, MaxPositionEmbeddings = 16, RmsNormEps = 1e-5, BosTokenId = 1, PadTokenId = 0 };
        var model = LlamaForCausalLM.CreateRandom(config, device: CPU, seed: 0);
        var rows = Enumerable.Range(0, 8).Select(i => new TokenizedExample(new[] { 1, 3, 4, 5, 6 }, new[] { 1, 3, 4, 5, 6 })).ToList();
        {{before}}
        var trainer = new Trainer(model, new FullFineTuning().Attach(model, new FullFineTuningOptions()),
            new TrainerOptions { OutputDir = Path.Combine(ScriptDirectory, "run"), MaxSteps = {{maxSteps}}, BatchSize = 2, ShowProgress = false }, Output);
        var result = trainer.Train({{train}});
        Output($"trained {result.Steps} (stopped {result.Stopped})");
        """;
}
