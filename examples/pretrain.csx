// Makes the embedded base model (examples/base-model): a 3.2M-parameter Llama pretrained from scratch on text the
// repo generates (see tasks.csx). Run rarely: every version of the weights stays in git history.
//   dotnet loraHub run examples/pretrain.csx [output folder] [steps]
#load "tasks.csx"
using LoRAHub.Models;
using LoRAHub.Models.Llama;
using LoRAHub.Models.Generation;
using LoRAHub.Models.Tokenization;
using LoRAHub.Training;
using LoRAHub.Training.Data;

var output = Args.Length > 0 ? Args[0] : Path.Combine(ScriptDirectory, "base-model");
var steps = Args.Length > 1 ? int.Parse(Args[1]) : 2000;
Directory.CreateDirectory(output);
File.WriteAllText(Path.Combine(output, "tokenizer.json"), Demo.TokenizerJson());
var tok = Tokenizer.FromFile(Path.Combine(output, "tokenizer.json"));

var config = new LlamaConfig
{
    VocabSize = tok.VocabSize, HiddenSize = 256, IntermediateSize = 688, NumHiddenLayers = 4, NumAttentionHeads = 4,
    NumKeyValueHeads = 4, MaxPositionEmbeddings = 256, RopeTheta = 10000, RmsNormEps = 1e-5, TieWordEmbeddings = true,
    BosTokenId = 1, PadTokenId = 0,
};
var model = LlamaForCausalLM.CreateRandom(config, device: Device, seed: 0);

// Every token of the corpus is a target; short lines are packed into sequences of 128 tokens.
var lines = Demo.PretrainingLines(60_000, seed: 1).Select(line => tok.Encode(line + "\n", addSpecialTokens: false));
var corpus = new TextDataset(DataLoader.Pack(lines.Select(ids => new TokenizedExample(ids, ids)).ToList(), 128));
Output($"pretraining {model.parameters().Sum(p => p.numel()):N0} parameters on {corpus.Count} sequences of up to 128 tokens, {steps} steps on {Device}");

var full = new FullFineTuning().Attach(model, new FullFineTuningOptions());
var trainer = new Trainer(model, full, new TrainerOptions
{
    OutputDir = Path.Combine(output, "..", "..", "runs", "pretrain"), MaxSteps = steps, BatchSize = 32, LearningRate = 3e-3,
    WarmupSteps = Math.Min(100, steps / 10), Schedule = LearningRateSchedule.Cosine, WeightDecay = 0.01, SaveEvery = 500, LogEvery = 50, Seed = 0,
    // Each run makes the base model afresh: the last run's checkpoints in runs/pretrain are deleted.
    Overwrite = true,
}, Output);
var result = trainer.Train(corpus, padTokenId: tok.PadTokenId);
Output(result.Summary());

PretrainedModel.Save(model, output);
var words = Demo.Rot1Words(5, seed: 99);
var copyCheck = TextGenerator.Generate(model, words.Select(w => tok.Encode($"copy {w} = ", addSpecialTokens: false)).ToList(),
    new GenerationOptions { MaxNewTokens = 5, StopTokenIds = [tok.TokenToId("\n")!.Value] });
foreach (var (w, ids) in words.Zip(copyCheck)) Output($"copy {w} = {tok.Decode(ids)}");
Output($"saved the base model to {Path.GetFullPath(output)}");
model.Dispose();
