using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Serialization;
using LoRAHub.Abstractions;
using LoRAHub.Models.Llama;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Bench;

/// <summary>
/// Activation checkpointing policies on the shapes of <see cref="TrainBench"/> (issue 19.3):
/// <list type="bullet">
/// <item><c>ckpt SHAPE METHOD BATCH SEQ POLICY [steps] [device]</c>: tokens/s and peak memory of one policy (all,
/// offload, budget:SIZE, none), 3 warm-up steps then the timed ones. One policy per process, so each peak starts afresh.</item>
/// <item><c>longest-seq SHAPE METHOD POLICY LIMIT_GIB [start] [max] [seconds] [device]</c>: batch 1, the longest sequence
/// whose training step fits in LIMIT_GIB of peak memory (and does not run out of memory): start and 2·start, then the
/// sequence the line through the two longest fits' peaks predicts (a little short of it, multiples of 4096, at most max),
/// then 4096 further from a fit, or halving towards the last fit from a miss. Needs <c>PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync</c>
/// for the peak of each probe (the pool's high-water mark, reset per probe). A probe that would likely not finish within
/// the seconds given for the probes (default 150; the build comes on top) is not run: a predicted sequence is lowered
/// until one would. Each probe prints its peak, its time and the MLP's token chunk (<see cref="ChunkedMlp"/>).</item>
/// </list>
/// Methods: lora, dora (bf16 base built on the GPU), qlora (NF4 base quantized while attaching, as TrainBench does).
/// </summary>
public static class CheckpointBench
{
    private static readonly JsonSerializerOptions Json = new() { NumberHandling = JsonNumberHandling.AllowNamedFloatingPointLiterals };

    private sealed class Setup(LlamaForCausalLM model, IAdapter adapter, Optimizer optimizer, List<Tensor> trainable) : IDisposable
    {
        public LlamaForCausalLM Model => model;
        public double BuildSeconds { get; init; }

        /// <summary>One training step on random tokens; returns the loss.</summary>
        public double Step(Tensor ids)
        {
            using var scope = NewDisposeScope();
            var loss = model.ComputeLoss(ids, ids);
            loss.backward();
            optimizer.step();
            foreach (var p in trainable) p.grad = null;
            return loss.ToDouble();
        }

        public void Dispose()
        {
            optimizer.Dispose();
            adapter.Dispose();
            model.Dispose();
        }
    }

    private static Setup Build(string shape, string method, Device device, CheckpointPolicy policy)
    {
        var config = TrainBench.Shapes.TryGetValue(shape, out var c) ? c : throw new ArgumentException($"unknown shape '{shape}'; known: {string.Join(", ", TrainBench.Shapes.Keys)}");
        var dtype = device.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32;
        var sw = Stopwatch.StartNew();
        var qlora = method == "qlora";
        // As TrainBench, LORAHUB_BENCH_CUDNN_SDPA=0: attention without libtorch's cuDNN backend (flash / memory-efficient).
        if (Environment.GetEnvironmentVariable("LORAHUB_BENCH_CUDNN_SDPA") == "0") torchx.backends.cuda.enable_cudnn_sdp(false);
        // As TrainBench: QLoRA's bf16 model is built on the CPU and quantized onto the GPU layer by layer when attached.
        var model = qlora ? new LlamaForCausalLM(config, dtype, CPU) : LlamaForCausalLM.CreateRandom(config, dtype, device, seed: 0);
        if (qlora)
            using (no_grad())
                model.model.embed_weight.mul_(0.02);
        IAdapterMethod m = method switch
        {
            "lora" => new LoRAHub.Plugins.LoRA.LoraMethod(),
            "dora" => new LoRAHub.Plugins.DoRA.DoraMethod(),
            "qlora" => new LoRAHub.Plugins.QLoRA.QLoraMethod(),
            _ => throw new ArgumentException($"unknown method '{method}' (lora, dora, qlora)"),
        };
        object options = qlora
            ? new { r = 16, lora_alpha = 32, target_modules = TrainBench.Targets, lora_dropout = 0.0, device = device.ToString() }
            : new { r = 16, lora_alpha = 32, target_modules = TrainBench.Targets, lora_dropout = 0.0 };
        var adapter = m.Attach(model, options);
        model.CheckpointPolicy = policy;
        var groups = adapter.ParameterGroups(1e-4, 0.0).Where(g => g.Parameters.Count > 0).ToList();
        var optimizer = adapter.CreateOptimizer(groups, new OptimizerSettings(1e-4, 0.0)) ?? new AdamW(groups);
        return new Setup(model, adapter, optimizer, groups.SelectMany(g => g.Parameters).ToList()) { BuildSeconds = sw.Elapsed.TotalSeconds };
    }

    private static string PlanText(LayerCheckpoint[] plan) =>
        $"keep {plan.Count(p => p == LayerCheckpoint.Keep)}, checkpoint {plan.Count(p => p == LayerCheckpoint.Checkpoint)}, offload {plan.Count(p => p == LayerCheckpoint.Offload)}";

    private static double Gib(long bytes) => Math.Round(bytes / (double)(1L << 30), 2);

    private static void Synchronize(Device device)
    {
        if (device.type == DeviceType.CUDA) cuda.synchronize(device);
    }

    /// <summary>Tokens/s and peak memory of one checkpoint policy.</summary>
    public static void Train(string shape, string method, int batch, int seq, string policyText, int steps, Device device)
    {
        var policy = CheckpointPolicy.Parse(policyText);
        var index = Math.Max(0, device.index);
        if (device.type == DeviceType.CUDA)
        {
            torchx.cuda.empty_cache();
            torchx.cuda.reset_peak_memory_stats(index);
        }
        using var setup = Build(shape, method, device, policy);
        using var ids = randint(0, setup.Model.VocabSize, [batch, seq], device: device);
        LayerCheckpoint[] plan;
        using (enable_grad()) plan = setup.Model.CheckpointPlan(ids);
        double loss = 0;
        for (var i = 0; i < 3; i++) loss = setup.Step(ids);
        Synchronize(device);
        var sw = Stopwatch.StartNew();
        for (var i = 0; i < steps; i++) loss = setup.Step(ids);
        Synchronize(device);
        var dt = sw.Elapsed.TotalSeconds / steps;
        var stats = torchx.utils.checkpoint_offload_stats();
        Console.WriteLine(JsonSerializer.Serialize<object>(new
        {
            impl = "lorahub", bench = "ckpt", shape, method, batch, seq, policy = policy.ToString(), plan = PlanText(plan),
            step_ms = Math.Round(dt * 1000, 1), tokens_per_s = Math.Round(batch * seq / dt),
            peak_gib = device.type == DeviceType.CUDA ? Gib(torchx.cuda.max_memory_allocated(index)) : 0, exact_peak = torchx.cuda.memory_stats_exact,
            loss, pinned_gib = Gib(stats.PinnedReservedBytes), build_s = Math.Round(setup.BuildSeconds, 1),
            mlp_chunk = MlpChunkTokens(setup.Model, (long)batch * seq),
        }, Json));
    }

    /// <summary>The longest batch-1 sequence whose training step fits in <paramref name="limitGib"/> of peak memory.</summary>
    public static void LongestSequence(string shape, string method, string policyText, double limitGib, int start, int max, double seconds, Device device)
    {
        if (device.type != DeviceType.CUDA)
            Console.Error.WriteLine("longest-seq: on the CPU there is no device memory to measure (every peak reads 0): a smoke run of the probing only");
        else if (!torchx.cuda.memory_stats_exact)
            Console.Error.WriteLine("longest-seq: WARNING: without PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync the peak is the device's used memory, not the high-water mark per probe");
        var policy = CheckpointPolicy.Parse(policyText);
        var index = Math.Max(0, device.index);
        using var setup = Build(shape, method, device, policy);
        using (var warm = randint(0, setup.Model.VocabSize, [1, Math.Min(start, 2048)], device: device))
            setup.Step(warm); // kernel compilation and library set-up, so the first probe's time predicts the next
        var clock = Stopwatch.StartNew(); // the probes' time (the build's is reported apart)
        var limit = (long)(limitGib * (1L << 30));
        int best = 0, miss = 0;
        double lastStep = 0;

        (bool ok, long peak) Probe(int seq, double expected)
        {
            torchx.utils.empty_offload_cache(); // the pinned buffers of the last size fit no other
            torchx.cuda.empty_cache();
            torchx.cuda.reset_peak_memory_stats(index);
            var sw = Stopwatch.StartNew();
            string outcome;
            double loss = double.NaN;
            long peak;
            try
            {
                using var ids = randint(0, setup.Model.VocabSize, [1, seq], device: device);
                loss = setup.Step(ids);
                Synchronize(device);
                peak = torchx.cuda.max_memory_allocated(index);
                outcome = peak <= limit ? "fits" : "over the limit";
            }
            catch (Exception e) when (e is OutOfMemoryTorchException || (e is TorchException t && t.Kind == TorchErrorKind.OutOfMemory))
            {
                peak = torchx.cuda.max_memory_allocated(index);
                outcome = "out of memory";
                foreach (var p in setup.Model.parameters()) p.grad = null;
            }
            lastStep = sw.Elapsed.TotalSeconds;
            var ok = outcome == "fits";
            Console.WriteLine(JsonSerializer.Serialize<object>(new
            {
                impl = "lorahub", bench = "longest-seq-probe", shape, method, policy = policy.ToString(), seq, outcome,
                peak_gib = Gib(peak), limit_gib = limitGib, step_s = Math.Round(lastStep, 2), expected_s = Math.Round(expected, 1), loss,
                offload_copies = torchx.utils.checkpoint_offload_stats().Copies, pinned_gib = Gib(torchx.utils.checkpoint_offload_stats().PinnedReservedBytes),
                mlp_chunk = MlpChunk(seq), cudnn_sdpa = torchx.backends.cuda.cudnn_sdp_enabled(),
            }, Json));
            return (ok, peak);
        }

        // start and 2·start give a line: the peak grows linearly with the sequence (flash attention, a checkpointed layer's
        // activations, the MLP run in token chunks past a size). Then the sequence the line through the two longest fits
        // predicts, conservatively (1% below the limit, the slope 3% steeper: on llama-7b QLoRA the slope from 32k..64k
        // was 2.6% below the one from 64k..136k), a multiple of Step, capped by max and by the time left; from a fit one
        // Step further, from a miss halves towards the last fit, down to Step. A step's time grows as a·T + b·T²
        // (attention quadratically): fitted through the two longest fits (+15%), a probe that would likely overrun the
        // seconds given is not run; a predicted sequence that would is lowered in Steps until one would not.
        const int Step = 4096;
        var fits = new List<(int seq, long peak, double seconds)>();
        // LORAHUB_LONGEST_PROBES=a,b,...: these sequences first, in order and whatever the time (e.g. to settle one
        // length), then the search goes on from what they showed.
        var listed = new Queue<int>((Environment.GetEnvironmentVariable("LORAHUB_LONGEST_PROBES") ?? "")
            .Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(int.Parse));

        double Expected(int seq)
        {
            if (fits.Count == 0) return 0;
            var (t2, s2) = (fits[^1].seq, fits[^1].seconds);
            if (fits.Count == 1) return s2 * Math.Pow((double)seq / t2, 2) * 1.2;
            var (t1, s1) = (fits[^2].seq, fits[^2].seconds);
            var b = Math.Max(0, (s2 / t2 - s1 / t1) / (t2 - t1));
            var a = Math.Max(0, s2 / t2 - b * t2);
            return Math.Max(s2, (a * seq + b * (double)seq * seq) * 1.15);
        }
        bool Affordable(int seq) => fits.Count == 0 || clock.Elapsed.TotalSeconds + Expected(seq) <= seconds;

        int Next()
        {
            if (miss > 0)
            {
                var mid = (best + miss) / 2 / Step * Step;
                return mid > best && mid < miss ? mid : 0;
            }
            if (fits.Count == 0) return start;
            if (best >= max) return 0;
            if (fits.Count == 1) return Math.Min(max, 2 * best);
            var ((q1, p1, _), (q2, p2, _)) = (fits[^2], fits[^1]);
            var slope = (double)(p2 - p1) / (q2 - q1);
            var predicted = slope > 0 ? (long)(q2 + (0.99 * limit - p2) / (1.03 * slope)) / Step * Step : (long)max;
            var next = (int)Math.Min(max, Math.Max(predicted, best + Step));
            while (next > best + Step && !Affordable(next)) next -= Step; // the longest one the time allows
            return next;
        }

        while (true)
        {
            var fromList = listed.Count > 0;
            var next = fromList ? listed.Dequeue() : Next();
            if (next <= 0 || (!fromList && !Affordable(next))) break;
            var (ok, peak) = Probe(next, Expected(next));
            if (ok)
            {
                best = Math.Max(best, next);
                fits.Add((next, peak, lastStep));
                fits.Sort((a, b) => a.seq.CompareTo(b.seq)); // the line and the time through the two longest
            }
            else miss = miss == 0 ? next : Math.Min(miss, next);
            // LORAHUB_LONGEST_AB=sdpa,chunk: the second probe once more with cuDNN attention switched (which backend's
            // backward holds less at long sequences) and/or with the MLP whole (what chunking saves and costs there), for
            // the record only: the search goes on as it started, and these probes' time counts against the seconds.
            if (fits.Count == 2 && next == fits[1].seq)
            {
                var ab = (Environment.GetEnvironmentVariable("LORAHUB_LONGEST_AB") ?? "").Split(',', StringSplitOptions.TrimEntries);
                var stepBefore = lastStep;
                if (ab.Contains("sdpa") && torchx.backends.cuda.cudnn_sdp_available)
                {
                    var cudnn = torchx.backends.cuda.cudnn_sdp_enabled();
                    torchx.backends.cuda.enable_cudnn_sdp(!cudnn);
                    Console.WriteLine($"{{\"ab\":\"cuDNN attention {(cudnn ? "off" : "on")} for the probe below\"}}");
                    Probe(next, 0);
                    torchx.backends.cuda.enable_cudnn_sdp(cudnn);
                }
                if (ab.Contains("chunk"))
                {
                    var (enabled, size) = (ChunkedMlp.Enabled, ChunkedMlp.ChunkTokens);
                    ChunkedMlp.Enabled = false;
                    Console.WriteLine("{\"ab\":\"MLP whole (no token chunks) for the probe below\"}");
                    Probe(next, 0);
                    (ChunkedMlp.Enabled, ChunkedMlp.ChunkTokens) = (enabled, size);
                }
                lastStep = stepBefore;
            }
        }
        Console.WriteLine(JsonSerializer.Serialize<object>(new
        {
            impl = "lorahub", bench = "longest-seq", shape, method, batch = 1, policy = policy.ToString(), limit_gib = limitGib,
            longest_seq = best, first_miss = miss == 0 ? (int?)null : miss, exact_peak = torchx.cuda.memory_stats_exact,
            build_s = Math.Round(setup.BuildSeconds, 1), probes_s = Math.Round(clock.Elapsed.TotalSeconds, 1),
        }, Json));

        long MlpChunk(int seq) => MlpChunkTokens(setup.Model, seq);
    }

    // Tokens per MLP chunk for a batch of this many tokens (0: whole), as LlamaMLP decides it (ChunkedMlp, LORAHUB_MLP_CHUNK).
    private static long MlpChunkTokens(LlamaForCausalLM model, long tokens) => ChunkedMlp.ChunkSize(tokens, model.Config.IntermediateSize, model.DType switch
    {
        ScalarType.BFloat16 or ScalarType.Float16 => 2,
        ScalarType.Float64 => 8,
        _ => 4,
    }) ?? 0;
}
