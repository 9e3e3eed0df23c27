// Padding-free packing against padded batches: real (non-padding) tokens per second of LoRA r16 training on
// examples of mixed lengths (uniform in [min, max]), the same examples in the same order in every mode (so the same
// loss, within bf16 noise). Modes: padded (one example per row, padding mask), packed-mask (packed rows, attention with
// the block-diagonal mask) and packed (packed rows, attention split by example: CUDA's default). One JSON line per
// (batch, mode) on stdout.
//   dotnet loraHub run [--device cuda:0] src/Training/bench/packing_bench.csx [shape] [min] [max] [steps] [batches]
// shape: llama-1b (Llama-3.2-1B-like, random weights, as bench/LoRAHub.Bench) or tiny (CPU smoke run); batches: e.g. 4,8.
using System.Diagnostics;
using System.Text.Json;
using LoRAHub.Models.Llama;
using LoRAHub.Training;
using LoRAHub.Training.Data;

var shape = Args.Length > 0 ? Args[0] : "llama-1b";
var minLength = Args.Length > 1 ? int.Parse(Args[1]) : 64;
var maxLength = Args.Length > 2 ? int.Parse(Args[2]) : 2048;
var steps = Args.Length > 3 ? int.Parse(Args[3]) : 16;
var batches = (Args.Length > 4 ? Args[4] : "4,8").Split(',').Select(int.Parse).ToArray();
const int warmup = 3;
var cuda = Device.type == DeviceType.CUDA;
var dtype = cuda ? ScalarType.BFloat16 : ScalarType.Float32;

var config = shape switch
{
    "llama-1b" => new LlamaConfig
    {
        HiddenSize = 2048, IntermediateSize = 8192, NumHiddenLayers = 16, NumAttentionHeads = 32, NumKeyValueHeads = 8,
        VocabSize = 128256, TieWordEmbeddings = true, RopeTheta = 500000, MaxPositionEmbeddings = 4096, RmsNormEps = 1e-6,
    },
    "tiny" => new LlamaConfig
    {
        HiddenSize = 64, IntermediateSize = 128, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
        VocabSize = 256, MaxPositionEmbeddings = 4096, RmsNormEps = 1e-6,
    },
    _ => throw new ArgumentException($"unknown shape '{shape}' (llama-1b, tiny)"),
};
var model = LlamaForCausalLM.CreateRandom(config, dtype, Device, seed: 0);
torchx.manual_seed(0);
var lora = Method("lora").Attach(model, new { r = 16, lora_alpha = 32, lora_dropout = 0.0,
    target_modules = new[] { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" } });
// Every run starts from the same adapter weights, so that the two modes' losses can be compared step by step.
var initial = model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => (p.parameter, copy: p.parameter.detach().clone())).ToList();

var random = new Random(1);
var examples = Enumerable.Range(0, (warmup + steps) * batches.Max()).Select(_ =>
{
    var ids = Enumerable.Range(0, random.Next(minLength, maxLength + 1)).Select(_ => 3 + random.Next(config.VocabSize - 3)).ToArray();
    return new TokenizedExample(ids, ids);
}).ToList();
var data = new TextDataset(examples);

foreach (var batch in batches)
    foreach (var mode in new[] { "padded", "packed-mask", "packed" })
    {
        var packing = mode != "padded";
        PackedAttention.SplitByExample = mode == "packed-mask" ? false : null;
        using (torch.no_grad())
            foreach (var (p, copy) in initial) p.copy_(copy);
        var output = Path.Combine(Path.GetTempPath(), $"lorahub-packing-bench-{Environment.ProcessId}");
        var trainer = new Trainer(model, lora, new TrainerOptions
        {
            OutputDir = output, MaxSteps = warmup + steps, BatchSize = batch, LearningRate = 1e-4, WarmupSteps = 0,
            Schedule = LearningRateSchedule.Constant, ShowProgress = false, LogEvery = 0, Packing = packing, Seed = 7,
            Overwrite = true, // one scratch folder for every configuration
        }, line => { if (line.Contains("packing")) Output(line); });
        // Timed from the end of the warm-up steps: real tokens (Tokens counts no padding) over wall time.
        var clock = new Stopwatch();
        long tokensAtStart = 0, tokensAtEnd = 0;
        trainer.StepCompleted += m =>
        {
            if (cuda) torch.cuda.synchronize();
            if (m.Step == warmup) { clock.Restart(); tokensAtStart = m.Tokens; }
            if (m.Step == warmup + steps) { clock.Stop(); tokensAtEnd = m.Tokens; }
        };
        if (cuda)
        {
            torchx.cuda.empty_cache();
            torchx.cuda.reset_peak_memory_stats(Math.Max(Device.index, 0));
        }
        var result = trainer.Train(data);
        var seconds = clock.Elapsed.TotalSeconds;
        Output(JsonSerializer.Serialize(new
        {
            bench = "packing", shape, mode, batch, min_length = minLength, max_length = maxLength, steps,
            real_tokens_per_s = Math.Round((tokensAtEnd - tokensAtStart) / seconds), step_ms = Math.Round(seconds / steps * 1000, 1),
            // Exact only under PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync (see torchx.cuda); null otherwise.
            peak_gib = cuda && torchx.cuda.memory_stats_exact ? Math.Round(torchx.cuda.max_memory_allocated(Math.Max(Device.index, 0)) / (double)(1L << 30), 2) : (double?)null,
            losses = result.Losses.Select(l => Math.Round(l, 4)).ToArray(),
        }));
        if (Directory.Exists(output)) Directory.Delete(output, recursive: true);
    }
