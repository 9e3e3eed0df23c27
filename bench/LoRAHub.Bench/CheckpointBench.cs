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
/// <item><c>longest-seq SHAPE METHOD POLICY LIMIT_GIB [start] [max] [seconds] [device]</c>: batch 1, the sequence doubled
/// from start while a training step fits in LIMIT_GIB of peak memory (and does not run out of memory), capped by the
/// sequence the last two peaks predict, then one probe halfway between the last fit and the first miss. Needs <c>PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync</c> for the
/// peak of each probe (the pool's high-water mark, reset per probe). Stops early when the next probe would likely not
/// finish within the seconds given for the probes (default 150; the build comes on top).</item>
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

        (bool ok, long peak) Probe(int seq)
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
                peak_gib = Gib(peak), limit_gib = limitGib, step_s = Math.Round(lastStep, 2), loss,
                offload_copies = torchx.utils.checkpoint_offload_stats().Copies,
            }, Json));
            return (ok, peak);
        }

        // Doubling while it fits; from two fits on, the peak's straight line through the last two (flash attention and a
        // checkpointed layer's activations grow linearly with the sequence) caps the next probe at the predicted longest
        // sequence (a multiple of 4096). Then one probe halfway between the last fit and the first miss. A step's time grows
        // at least linearly with the sequence (attention quadratically): a probe that would likely overrun is skipped.
        // Seconds a probe at seq likely takes, from the last fit's: quadratic (attention) with 20% to spare.
        double Expected(int seq) => lastStep * Math.Pow((double)seq / best, 2) * 1.2;
        var fits = new List<(int seq, long peak)>();
        var next = start;
        while (next <= max)
        {
            if (best > 0 && clock.Elapsed.TotalSeconds + Expected(next) > seconds) break;
            var (ok, peak) = Probe(next);
            if (!ok)
            {
                miss = next;
                break;
            }
            best = next;
            fits.Add((next, peak));
            var candidate = (long)next * 2;
            if (fits.Count >= 2)
            {
                var ((s1, p1), (s2, p2)) = (fits[^2], fits[^1]);
                var slope = (double)(p2 - p1) / (s2 - s1);
                if (slope > 0) candidate = Math.Min(candidate, (s2 + (long)((limit - p2) / slope)) / 4096 * 4096);
            }
            if (candidate <= next) break; // the line says this is the longest
            next = (int)Math.Min(candidate, int.MaxValue);
        }
        if (best > 0 && miss > best + 4096 && clock.Elapsed.TotalSeconds + Expected((best + miss) / 2) < seconds)
        {
            var mid = (best + miss) / 2 / 4096 * 4096;
            if (mid > best && Probe(mid).ok) best = mid;
        }
        Console.WriteLine(JsonSerializer.Serialize<object>(new
        {
            impl = "lorahub", bench = "longest-seq", shape, method, batch = 1, policy = policy.ToString(), limit_gib = limitGib,
            longest_seq = best, first_miss = miss == 0 ? (int?)null : miss, exact_peak = torchx.cuda.memory_stats_exact,
            build_s = Math.Round(setup.BuildSeconds, 1), probes_s = Math.Round(clock.Elapsed.TotalSeconds, 1),
        }, Json));
    }
}
