// Throughput of serve's batched generation: K adapters × M rows each, decoded (a) in ONE batch whose rows use
// different adapters (IAdapterSet.UseAdapterPerRow, what serve does with concurrent requests), (b) one adapter at a
// time (K batches of M rows, what a server without mixed batches does), and (c) the base model alone on K×M rows (the
// ceiling). Greedy, KV cache, fixed lengths (no early stop). One JSON line per case on stdout.
//   dotnet loraHub run [--device cuda] src/Server/bench/serve_bench.csx [shape] [K] [M] [prompt] [new] [r] [repeats]
// shape: tiny (the embedded model), llama-1b (TinyLlama's shapes, random weights) or a model folder.
using System.Diagnostics;
using System.Text.Json;
using LoRAHub.Models.Llama;

var shape = Args.Length > 0 ? Args[0] : "tiny";
var adapters = Args.Length > 1 ? int.Parse(Args[1]) : 8;
var rowsPerAdapter = Args.Length > 2 ? int.Parse(Args[2]) : 4;
var promptLength = Args.Length > 3 ? int.Parse(Args[3]) : 128;
var newTokens = Args.Length > 4 ? int.Parse(Args[4]) : 128;
var rank = Args.Length > 5 ? int.Parse(Args[5]) : 16;
var repeats = Args.Length > 6 ? int.Parse(Args[6]) : 3;
var dtype = Device.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32;

ICausalLanguageModel model = shape switch
{
    "tiny" => PretrainedModel.Load(Path.Combine(ScriptDirectory, "..", "..", "..", "examples", "base-model"), dtype, Device),
    "llama-1b" => new LlamaForCausalLM(LlamaConfig.FromJson("""
        {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
         "num_attention_heads": 32, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000,
         "max_position_embeddings": 4096, "tie_word_embeddings": false}
        """), dtype, Device, "llama-1b-random"),
    _ => PretrainedModel.Load(shape, dtype, Device),
};
model.Root.eval();
var vocab = model.VocabSize;

// K adapters: LoRA r on every linear layer, B filled with noise so that each really changes the output.
var folder = Path.Combine(Path.GetTempPath(), $"lorahub-serve-bench-{Environment.ProcessId}");
for (var k = 0; k < adapters; k++)
{
    torchx.manual_seed(k + 1);
    var lora = Method("lora").Attach(model, new { r = rank, lora_alpha = 2 * rank, target_modules = "all-linear" });
    using (torch.no_grad())
        foreach (var (name, p) in model.Root.named_parameters())
            if (name.Contains("lora_B")) p.copy_(torch.randn(p.shape, p.dtype, p.device) * 0.01);
    lora.Save(Path.Combine(folder, $"a{k}"));
    lora.Unload();
    lora.Dispose();
}
var hub = new AdapterHub(model, Methods, maxLoaded: adapters);
for (var k = 0; k < adapters; k++) hub.Register($"a{k}", Path.Combine(folder, $"a{k}"));

var random = new Random(0);
var options = new GenerationOptions { MaxNewTokens = newTokens, PadTokenId = 0 };
int[] Prompt() => Enumerable.Range(0, promptLength).Select(_ => 3 + random.Next(vocab - 3)).ToArray();
var prompts = Enumerable.Range(0, adapters * rowsPerAdapter).Select(_ => Prompt()).ToList();
string AdapterOf(int row) => $"a{row / rowsPerAdapter}";

void Sync() { if (Device.type == DeviceType.CUDA) torch.cuda.synchronize(); }

// One timed run: batches of (row indices, served adapter names) in order; returns generated tokens per second.
double Run(List<(List<int> Rows, List<string> Names)> batches)
{
    Sync();
    var clock = Stopwatch.StartNew();
    long tokens = 0;
    foreach (var (rows, names) in batches)
    {
        var (set, setNames, scope) = hub.Prepare(names);
        using (scope)
        {
            var generated = TextGenerator.Generate(model, rows.Select((r, i) => new GenerationRow(prompts[r], options, setNames[i])).ToList(), set);
            tokens += generated.Sum(g => g.Length);
        }
    }
    Sync();
    return tokens / clock.Elapsed.TotalSeconds;
}

var all = Enumerable.Range(0, prompts.Count).ToList();
var cases = new List<(string Case, List<(List<int>, List<string>)> Batches)>
{
    ("mixed: all adapters in one batch", [(all, all.Select(AdapterOf).ToList())]),
    ("one adapter at a time", Enumerable.Range(0, adapters).Select(k =>
        (Enumerable.Range(k * rowsPerAdapter, rowsPerAdapter).ToList(), Enumerable.Repeat($"a{k}", rowsPerAdapter).ToList())).ToList()),
    ("base model alone, one batch", [(all, all.Select(_ => IAdapterSet.BaseName).ToList())]),
};
Run(cases[0].Batches); // warm-up: loads every adapter, CUDA kernels, allocator
foreach (var (name, batches) in cases)
{
    var runs = Enumerable.Range(0, repeats).Select(_ => Run(batches)).OrderBy(x => x).ToList();
    Output(JsonSerializer.Serialize(new
    {
        bench = "serve-batching", @case = name, shape, device = Device.ToString(), dtype = dtype.ToString(), adapters, rows_per_adapter = rowsPerAdapter,
        batch_rows = batches.Max(b => b.Item1.Count), batches = batches.Count, prompt = promptLength, new_tokens = newTokens, rank,
        tokens_per_s = Math.Round(runs[runs.Count / 2], 1), runs = runs.Select(r => Math.Round(r, 1)),
    }));
}
hub.Dispose();
Directory.Delete(folder, recursive: true);
