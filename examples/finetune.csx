// The main job: fine-tune the embedded base model on rot1 with a method plugin, measure exact match before and
// after, save the adapter in PEFT's format, merge it, and show a few generations.
//   dotnet loraHub run [--method lora|galore|headlora|...] examples/finetune.csx [steps] [eval words] [output folder]
#load "tasks.csx"
using LoRAHub.Models;
using LoRAHub.Models.Generation;
using LoRAHub.Models.Tokenization;
using LoRAHub.Training;

var methodName = MethodName ?? "lora";
var steps = Args.Length > 0 ? int.Parse(Args[0]) : 200;
var evalCount = Args.Length > 1 ? int.Parse(Args[1]) : 200;
var baseModel = Path.Combine(ScriptDirectory, "base-model");
var output = Path.GetFullPath(Args.Length > 2 ? Args[2] : Path.Combine(ScriptDirectory, "..", "runs", $"finetune-{methodName}"));

var onGpu = Device.type == DeviceType.CUDA;

var tok = Tokenizer.FromFolder(baseModel);
// Mixed precision on GPU: frozen weights in bf16; the method's trainable tensors and optimizer state stay fp32.
var model = PretrainedModel.LoadLlama(baseModel, onGpu ? ScalarType.BFloat16 : ScalarType.Float32, Device);
var evalWords = Demo.Rot1Words(evalCount, seed: 7);
var train = Demo.Rot1Dataset(tok, 4000, seed: 8, exclude: evalWords.ToHashSet());
var before = Demo.ExactMatch(model, tok, evalWords);
Output($"base model: rot1 exact match {before:P1} on {evalWords.Count} held-out words");

// Each method with settings that suit a 3M-parameter model; any other plugin runs with its defaults.
object options = methodName switch
{
    "lora" or "dora" => new { r = 16, lora_alpha = 32, target_modules = "all-linear" },
    "malora" => new { num_experts = 4, top_k = 2, shared_rank = 16, expert_rank = 16, lora_alpha = 32,
                      target_modules = new[] { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" } },
    // CPUs without bf16 matrix units run bf16 GEMMs many times slower than fp32: compute in fp32 there.
    "qlora" => new { r = 16, lora_alpha = 32, target_modules = "all-linear", bnb_4bit_compute_dtype = onGpu ? "bfloat16" : "float32" },
    "galore" => new { rank = 32, update_proj_gap = 100, scale = 0.25 },
    "adalora" => new { init_r = 12, target_r = 8, lora_alpha = 32, total_step = steps, tinit = steps / 10, tfinal = steps / 5,
                       target_modules = new[] { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" } },
    // Multi-head-aware LoRA, adaptive: every attention head starts at rank 6 (the MLP layers, plain LoRA, at 16) and the
    // budget falls to 4 per head or layer on average, moving to the heads (and matrices) that matter.
    "headlora" => new { adaptive = true, init_r = 6, target_r = 4, lora_alpha = 32, total_step = steps, tinit = steps / 10, tfinal = steps / 5,
                        head_ranks = new Dictionary<string, int[]> { ["gate_proj|up_proj|down_proj"] = [16] },
                        target_modules = new[] { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" } },
    // S²-Attn is for long contexts: on these 20-token lines its groups cut each answer off from its word (6% exact
    // match after 200 steps with group_size_ratio 0.5), so the demo trains LongLoRA's adapters with full attention.
    "longlora" => new { r = 16, lora_alpha = 32, target_modules = "all-linear", use_s2attn = false },
    _ => Method(methodName).CreateDefaultOptions(),
};
// Adapters draw their initial weights (LoRA's A, ...) from the global generator: seed it so every run is the same run.
torchx.manual_seed(0);
var adapter = Method(methodName).Attach(model, options);

var trainer = new Trainer(model, adapter, new TrainerOptions
{
    OutputDir = output, MaxSteps = steps, BatchSize = 32, LearningRate = methodName == "galore" ? 1e-2 : 4e-3,
    WarmupSteps = steps / 10, Schedule = LearningRateSchedule.Cosine, LogEvery = 25, SaveEvery = 100, Seed = 0,
    // The demo starts its run over each time: the last run's checkpoints in this folder are deleted.
    Overwrite = true,
}, Output);
var result = trainer.Train(train, padTokenId: tok.PadTokenId);
Output(result.Summary());

var after = Demo.ExactMatch(model, tok, evalWords);
Output($"{methodName}: rot1 exact match {before:P1} → {after:P1}");
var adapterDir = Path.Combine(output, "adapter");
adapter.Save(adapterDir);
Output($"adapter saved to {adapterDir}");
if (adapter.CanMerge)
{
    // PEFT's merge_and_unload: the plain model with the adapter folded into its weights, saved as an ordinary
    // Hugging Face folder (transformers loads it as it loads the base model).
    var merged = adapter.MergeAndUnload<ICausalLanguageModel>();
    var mergedWords = evalWords.Take(50).ToList();
    var mergedMatch = Demo.ExactMatch(merged, tok, mergedWords);
    var mergedDir = Path.Combine(output, "merged");
    PretrainedModel.Save(merged, mergedDir);
    File.Copy(Path.Combine(baseModel, "tokenizer.json"), Path.Combine(mergedDir, "tokenizer.json"), overwrite: true);
    Output($"merged model (exact match {mergedMatch:P1} on {mergedWords.Count} words) saved to {mergedDir}");
}
foreach (var (word, answer) in evalWords.Take(5).Zip(Demo.Answer(model, tok, evalWords.Take(5).ToList())))
    Output($"  rot1 {word} = {answer}   (expected {Demo.Rot1(word)})");
Output($"metrics: {result.MetricsFile}\nplot: {result.PlotFile}");
File.WriteAllText(Path.Combine(output, "result.json"),
    System.Text.Json.JsonSerializer.Serialize(new { method = methodName, steps, before, after, seconds = result.Elapsed.TotalSeconds }));
adapter.Dispose();
model.Dispose();
