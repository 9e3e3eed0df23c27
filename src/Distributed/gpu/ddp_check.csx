// Data-parallel trainer check on any backend (NCCL on GPUs, MPI on the CPU): a small random Llama in fp32, full
// fine-tuning, rows of unequal prompt-masked lengths. Rank 0 writes the loss curve to OUT/losses.json, every rank the
// gradient buckets it started during / after backward to OUT/launches-RANK.json (overlap: LORAHUB_DDP_OVERLAP, default on).
//   dotnet loraHub run [--nproc-per-node N] src/Distributed/gpu/ddp_check.csx OUT BATCH_PER_RANK SHARD(0/1) [KILL_AT_STEP] [METHOD]
// KILL_AT_STEP > 0: rank 1 kills itself (SIGKILL) after that step; checkpoints are written every 2 steps.
// METHOD: full (default) or galore (the plugin; projectors refreshed every 2 steps so that the check covers refreshes).
using System.Diagnostics;
using System.Text.Json;
using LoRAHub.Models.Llama;
using LoRAHub.Training;
using LoRAHub.Training.Data;

var output = Path.GetFullPath(Args[0]);
var batch = int.Parse(Args[1]);
var shard = Args[2] == "1";
var killAt = Args.Length > 3 ? int.Parse(Args[3]) : 0;
var rank = LoRAHub.Distributed.DistributedEnvironment.FromEnvironment().Rank;

var config = new LlamaConfig
{
    HiddenSize = 128, IntermediateSize = 256, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
    VocabSize = 512, TieWordEmbeddings = true, MaxPositionEmbeddings = 256,
};
var model = LlamaForCausalLM.CreateRandom(config, ScalarType.Float32, Device, seed: 0);
var methodName = Args.Length > 4 ? Args[4] : "full";
object options = methodName == "galore" ? new { rank = 16, update_proj_gap = 2, scale = 0.25 } : Method(methodName).CreateDefaultOptions();
var adapter = Method(methodName).Attach(model, options);

var rng = new Random(5);
var rows = new List<TokenizedExample>();
for (var i = 0; i < 64; i++)
{
    var length = rng.Next(16, 96);
    var prompt = rng.Next(1, length - 4);
    var ids = Enumerable.Range(0, length).Select(_ => rng.Next(2, config.VocabSize)).ToArray();
    rows.Add(new TokenizedExample(ids, ids.Select((t, j) => j < prompt ? TokenizedExample.IgnoreIndex : t).ToArray()));
}

var trainer = new Trainer(model, adapter, new TrainerOptions
{
    OutputDir = output, MaxSteps = killAt > 0 ? 50 : 6, BatchSize = batch, GradientAccumulationSteps = 2, LearningRate = 1e-3,
    WarmupSteps = 0, Schedule = LearningRateSchedule.Constant, WeightDecay = 0.01, SaveEvery = 2, ShowProgress = false, LogEvery = 0,
    Seed = 3, ShardOptimizerState = shard, BucketSizeBytes = 1 << 20,
}, Output);
if (killAt > 0)
    trainer.StepCompleted += m =>
    {
        if (m.Step == killAt && rank == 1) Process.GetCurrentProcess().Kill();
    };
var result = trainer.Train(new TextDataset(rows));
if (rank == 0) File.WriteAllText(Path.Combine(output, "losses.json"), JsonSerializer.Serialize(result.Losses));
var (inBackward, afterBackward) = LoRAHub.Distributed.GradientBuckets.Launches;
File.WriteAllText(Path.Combine(output, $"launches-{rank}.json"), JsonSerializer.Serialize(new[] { inBackward, afterBackward }));
