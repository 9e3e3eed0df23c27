using System.Diagnostics;
using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.Distributed;
using LoRAHub.Models.Llama;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Modules;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Bench;

/// <summary>
/// Training throughput on the shapes of ../shared/bench/peer_bench.py: random-initialised Llama in bf16, all seven
/// projections adapted at r16/α32, AdamW, batch × seq random tokens, optional activation checkpointing.
/// Prints the peer's JSON fields (tokens_per_s, step_ms, peak_gib, loss). peak_gib is
/// <c>torchx.cuda.max_memory_allocated</c>; compare it with the peer's under PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
/// (scripts/gpu/bench-train.sh MEMORY=1), where both read the CUDA memory pool's used-memory high-water mark.
/// </summary>
public static class TrainBench
{
    public static readonly Dictionary<string, LlamaConfig> Shapes = new()
    {
        ["llama-1b"] = new LlamaConfig
        {
            HiddenSize = 2048, IntermediateSize = 8192, NumHiddenLayers = 16, NumAttentionHeads = 32, NumKeyValueHeads = 8,
            VocabSize = 128256, TieWordEmbeddings = true, RopeTheta = 500000, MaxPositionEmbeddings = 4096, RmsNormEps = 1e-6,
        },
        ["llama-7b"] = new LlamaConfig
        {
            HiddenSize = 4096, IntermediateSize = 11008, NumHiddenLayers = 32, NumAttentionHeads = 32, NumKeyValueHeads = 32,
            VocabSize = 32000, TieWordEmbeddings = false, RopeTheta = 500000, MaxPositionEmbeddings = 4096, RmsNormEps = 1e-6,
        },
        // A small shape for CPU smoke runs of the benchmark itself.
        ["llama-tiny"] = new LlamaConfig
        {
            HiddenSize = 128, IntermediateSize = 344, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
            VocabSize = 1000, TieWordEmbeddings = true, RopeTheta = 10000, MaxPositionEmbeddings = 512,
        },
    };

    /// <summary>Seconds to load a saved checkpoint of the shape in bf16 onto the device (after one save).</summary>
    public static void LoadTime(string shape, Device device)
    {
        var folder = Path.Combine(Path.GetTempPath(), $"lorahub-load-{shape}");
        using (var model = LlamaForCausalLM.CreateRandom(Shapes[shape], ScalarType.BFloat16, device, seed: 0))
            LoRAHub.Models.PretrainedModel.Save(model, folder);
        var bytes = Directory.GetFiles(folder, "*.safetensors").Sum(f => new FileInfo(f).Length);
        var sw = Stopwatch.StartNew();
        using (var loaded = LoRAHub.Models.PretrainedModel.LoadLlama(folder, ScalarType.BFloat16, device))
        {
            if (IsCuda(device)) cuda.synchronize(device);
            Console.WriteLine(JsonSerializer.Serialize(new { impl = "lorahub", bench = "load", shape, device = device.ToString(), gib = Math.Round(bytes / (double)(1L << 30), 2), seconds = Math.Round(sw.Elapsed.TotalSeconds, 2) }));
        }
        Directory.Delete(folder, recursive: true);
    }

    private static bool IsCuda(Device device) => device.type == DeviceType.CUDA;

    public static readonly string[] Targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    public static void Run(string shape, string method, int batch, int seq, bool checkpointing, int steps, int warmup, Device device,
        Func<string, IAdapterMethod> methods)
    {
        // Data parallel when started by the launcher (WORLD_SIZE > 1): rank i on cuda:LOCAL_RANK, batch and seq per GPU.
        var env = DistributedEnvironment.FromEnvironment();
        if (env.IsDistributed && IsCuda(device))
        {
            device = new Device(DeviceType.CUDA, env.LocalRank);
            distributed.set_device(env.LocalRank);
        }
        var config = Shapes.TryGetValue(shape, out var c) ? c : throw new ArgumentException($"unknown shape '{shape}'; known: {string.Join(", ", Shapes.Keys)}");
        var dtype = IsCuda(device) ? ScalarType.BFloat16 : ScalarType.Float32;
        if (IsCuda(device))
        {
            torchx.cuda.empty_cache();
            torchx.cuda.reset_peak_memory_stats(Math.Max(device.index, 0));
        }
        // LORAHUB_BENCH_CUDNN_SDPA=0: attention without libtorch's cuDNN backend (flash / memory-efficient kernels instead).
        if (Environment.GetEnvironmentVariable("LORAHUB_BENCH_CUDNN_SDPA") == "0") torchx.backends.cuda.enable_cudnn_sdp(false);
        var build = Stopwatch.StartNew();
        // QLoRA never holds the bf16 model on the GPU: it is built on the CPU (the constructors' random init only, as a
        // second full-model init pass on the CPU would take minutes) and Attach quantizes it onto the GPU layer by layer.
        var qlora = method == "qlora";
        using var model = qlora ? new LlamaForCausalLM(config, dtype, CPU) : LlamaForCausalLM.CreateRandom(config, dtype, device, seed: 0);
        if (qlora)
            using (no_grad())
                model.model.embed_weight.mul_(0.02); // N(0, 0.02) as CreateRandom, so the loss starts where it does there
        var buildSeconds = build.Elapsed.TotalSeconds;
        model.GradientCheckpointing = checkpointing;
        // LORAHUB_BENCH_CKPT_POLICY (with CKPT 1): a CheckpointPolicy instead of every layer, e.g. "budget:10GiB" (selective
        // checkpointing: the layers that fit in that much activation memory keep their activations) or "offload".
        var policyName = checkpointing ? Environment.GetEnvironmentVariable("LORAHUB_BENCH_CKPT_POLICY") : null;
        if (!string.IsNullOrEmpty(policyName)) model.CheckpointPolicy = CheckpointPolicy.Parse(policyName);
        object options = method switch
        {
            "full" => new object(),
            "galore" => new { rank = shape == "llama-7b" ? 256 : 128, update_proj_gap = 200, scale = 0.25 },
            "qlora" => new { r = 16, lora_alpha = 32, target_modules = Targets, lora_dropout = 0.0, device = device.ToString() },
            _ => new { r = 16, lora_alpha = 32, target_modules = Targets, lora_dropout = 0.0 },
        };
        var attach = Stopwatch.StartNew();
        IAdapter adapter = methods(method).Attach(model, options);
        using var _ = adapter;
        var attachSeconds = attach.Elapsed.TotalSeconds;
        var groups = adapter.ParameterGroups(1e-4, 0.0).Where(g => g.Parameters.Count > 0).ToList();
        Optimizer MakeOptimizer(IReadOnlyList<ParamGroup> g) => adapter.CreateOptimizer(g, new OptimizerSettings(1e-4, 0.0)) ?? new AdamW(g);
        // The peer's DDP keeps whole optimizer state on every GPU; LORAHUB_BENCH_ZERO=1 shards it as the trainer does for full/GaLore.
        var group = env.IsDistributed ? distributed.init_process_group(device) : null;
        var zero = group != null && Environment.GetEnvironmentVariable("LORAHUB_BENCH_ZERO") == "1";
        using var optimizer = zero ? new LoRAHub.Training.Parallel.ZeroRedundancyOptimizer(group!, groups, MakeOptimizer) : MakeOptimizer(groups);
        var trainableParams = groups.SelectMany(g => g.Parameters).ToList();
        var trainable = trainableParams.Sum(p => p.numel());
        // Gradient all-reduce overlapped with backward as the trainer does (LORAHUB_DDP_OVERLAP=0: all after backward).
        // LORAHUB_BENCH_BUCKET_MB: the gradient bucket size (TrainerOptions.BucketSizeBytes; default 25 MB, as DDP's).
        var bucketBytes = Environment.GetEnvironmentVariable("LORAHUB_BENCH_BUCKET_MB") is { } mb ? (long)(double.Parse(mb) * (1 << 20)) : GradientBuckets.DefaultBucketBytes;
        using var buckets = group != null ? new LoRAHub.Training.Parallel.GradientSync(group, model, trainableParams, bucketBytes) : null;
        // Each rank its own data (as the peer's generator seeded 1000 + rank); one process keeps the old stream.
        if (group != null) torchx.manual_seed(1000 + group.Rank);
        using var ids = randint(0, config.VocabSize, [batch, seq], device: device);
        // The loss is read once, after the timed steps (as the peer does: reading it every step would make the host wait
        // for the GPU at each step's end, and the next step's forward would start with an empty queue: the GPU then waits
        // for the host through that forward). LORAHUB_BENCH_SYNC=1 reads it every step and reports how long that waits
        // (gpu_wait_ms: little waiting means the host, not the GPU, sets the pace).
        var syncEveryStep = Environment.GetEnvironmentVariable("LORAHUB_BENCH_SYNC") == "1";
        Tensor? lastLoss = null;
        // Test hook for the killed-rank case on GPUs: LORAHUB_BENCH_KILL=RANK:STEP makes that rank SIGKILL itself after that step.
        var kill = Environment.GetEnvironmentVariable("LORAHUB_BENCH_KILL")?.Split(':').Select(int.Parse).ToArray();
        var stepIndex = 0;
        double syncWait = 0, hostForward = 0, hostBackward = 0, hostOptimizer = 0;

        // The trainer's step hooks: an open step lets layers cache what the weights determine until the optimizer step
        // (DoRA's norms and row scales: one grouped launch per step instead of one per projection per forward).
        // LORAHUB_BENCH_STEP_HOOKS=0 leaves them out (every forward then recomputes what a step could cache).
        var stepHooks = Environment.GetEnvironmentVariable("LORAHUB_BENCH_STEP_HOOKS") != "0";
        long stepNumber = 0;

        void Step()
        {
            using var scope = NewDisposeScope();
            if (stepHooks) adapter.OnStepBegin(stepNumber);
            buckets?.prepare_for_backward();
            // Host time per phase: how long the host takes to enqueue forward, backward (libtorch's engine thread, our
            // C# backward functions included) and the optimizer step — where launch overhead would have to be cut.
            var t0 = Stopwatch.GetTimestamp();
            var loss = model.ComputeLoss(ids, ids);
            var t1 = Stopwatch.GetTimestamp();
            // Mean of the ranks' gradients, as DDP, by dividing the loss (one scalar) instead of the summed gradients:
            // a pass over every bucket after its all-reduce, which would run after backward, on the step's tail.
            // As the trainer: custom functions write their parameters' gradients into .grad themselves (LORAHUB_LEAF_GRADIENTS=0: off).
            using (CustomFunction.AccumulateLeafGradients())
            {
                if (group is { WorldSize: > 1 })
                {
                    using var perRank = loss.div(group.WorldSize);
                    perRank.backward();
                }
                else loss.backward();
            }
            var t2 = Stopwatch.GetTimestamp();
            buckets?.finish();
            if (stepHooks) adapter.OnAfterBackward(stepNumber);
            optimizer.step();
            foreach (var p in trainableParams) p.grad = null;
            if (stepHooks) adapter.OnStepEnd(stepNumber);
            stepNumber++;
            hostForward += Stopwatch.GetElapsedTime(t0, t1).TotalSeconds;
            hostBackward += Stopwatch.GetElapsedTime(t1, t2).TotalSeconds;
            hostOptimizer += Stopwatch.GetElapsedTime(t2).TotalSeconds;
            lastLoss?.Dispose();
            lastLoss = loss.detach().DetachFromDisposeScope();
            if (syncEveryStep)
            {
                // The host has enqueued the whole step here; reading the loss waits for the GPU.
                var enqueued = Stopwatch.GetTimestamp();
                lastLoss.ToDouble();
                syncWait += Stopwatch.GetElapsedTime(enqueued).TotalSeconds;
            }
            group?.ThrowIfFailed();
            if (kill != null && group?.Rank == kill[0] && ++stepIndex == kill[1])
            {
                Console.Error.WriteLine($"rank {group.Rank}: killing myself after step {stepIndex} (LORAHUB_BENCH_KILL)");
                System.Diagnostics.Process.GetCurrentProcess().Kill();
            }
        }

        for (var i = 0; i < warmup; i++) Step();
        if (IsCuda(device)) cuda.synchronize(device);
        // Setup's garbage (model construction, random init) is collected before the timed steps, as BenchmarkDotNet does
        // before each iteration: otherwise the one full collection it causes lands in a short timed window (a 5-step
        // data-parallel run paid 11.5 ms for it) instead of once per training run.
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        group?.barrier();
        syncWait = hostForward = hostBackward = hostOptimizer = 0;
        var leafWrites = CustomFunction.LeafGradientWrites;
        // Garbage collections during the timed steps: TorchSharp makes a finalizable object per tensor, and a collection
        // stops every managed thread, libtorch's autograd thread in our C# backward functions included.
        var (gc0, gc1, gc2, gcPause) = (GC.CollectionCount(0), GC.CollectionCount(1), GC.CollectionCount(2), GC.GetTotalPauseDuration());
        // LORAHUB_BENCH_PROFILE_STEP=k: marks timed step k (from 0) for a profiler capturing from an API call
        // (`ncu --profile-from-start off`): every kernel of one step, nothing of setup or warm-up.
        var profileStep = int.TryParse(Environment.GetEnvironmentVariable("LORAHUB_BENCH_PROFILE_STEP"), out var ps) && IsCuda(device) ? ps : -1;
        var sw = Stopwatch.StartNew();
        for (var i = 0; i < steps; i++)
        {
            if (i == profileStep) torchx.cuda.profiler.start();
            Step();
            if (i == profileStep) torchx.cuda.profiler.stop();
        }
        if (IsCuda(device)) cuda.synchronize(device);
        group?.barrier();
        var dt = sw.Elapsed.TotalSeconds / steps;
        var gc = new
        {
            gen0 = GC.CollectionCount(0) - gc0, gen1 = GC.CollectionCount(1) - gc1, gen2 = GC.CollectionCount(2) - gc2,
            pause_ms_per_step = Math.Round((GC.GetTotalPauseDuration() - gcPause).TotalMilliseconds / steps, 2),
        };
        var peak = IsCuda(device) ? torchx.cuda.max_memory_allocated(Math.Max(device.index, 0)) / (double)(1L << 30) : 0;
        var world = group?.WorldSize ?? 1;
        if (group != null)
        {
            using var p = tensor(new[] { peak }, device: device);
            group.all_reduce(p, ReduceOp.MAX);
            peak = p.cpu().item<double>();
        }
        if (group is { Rank: > 0 })
        {
            distributed.destroy_process_group();
            return;
        }
        // 4-bit weights are buffers, not parameters: count them as the weights they stand for.
        var quantized = model.modules().OfType<Linear4bit>().ToList();
        var parameters = model.parameters().Sum(p => p.numel()) + quantized.Sum(q => q.in_features * q.out_features);
        var quantizedGib = quantized.Sum(q => q.weight_bytes) / (double)(1L << 30);
        var pagedGib = IsCuda(device) ? UnifiedMemory.allocated_bytes / (double)(1L << 30) : 0;
        var optimizerStateBytes = optimizer.state_tensors().Values.Sum(t => t.numel() * t.element_size());
        // Model FLOPs: 6·N·tokens for the matmuls of a full step (LoRA skips the weight gradients: ≈ 4·N), plus attention.
        var tokens = (double)batch * seq * world;
        var matmulFlops = (method == "full" ? 6.0 : 4.0) * parameters * tokens;
        var attentionFlops = 12.0 * config.NumHiddenLayers * config.HiddenSize * seq * tokens / 2;
        Console.WriteLine(JsonSerializer.Serialize<object>(new
        {
            impl = "lorahub", shape, method, world, zero, overlap = buckets?.Overlapped ?? false, sparse_embedding = buckets?.SparseEmbedding ?? false, batch, seq, ckpt = checkpointing, ckpt_policy = model.CheckpointPolicy?.Name, r = 16, trainable,
            step_ms = Math.Round(dt * 1000, 1), gpu_wait_ms = syncEveryStep ? Math.Round(syncWait / steps * 1000, 1) : (double?)null,
            gc, host_ms = new { forward = Math.Round(hostForward / steps * 1000, 1), backward = Math.Round(hostBackward / steps * 1000, 1), optimizer = Math.Round(hostOptimizer / steps * 1000, 1) },
            tokens_per_s = Math.Round(tokens / dt), peak_gib = Math.Round(peak, 2),
            // True under cudaMallocAsync (the pool's high-water mark); else peak_gib is the device memory in use now.
            exact_peak = IsCuda(device) && torchx.cuda.memory_stats_exact,
            loss = lastLoss?.ToDouble() ?? double.NaN, optimizer_state_gib = Math.Round(optimizerStateBytes / (double)(1L << 30), 3), build_s = Math.Round(buildSeconds, 1), attach_s = Math.Round(attachSeconds, 1),
            quantized_weights_gib = Math.Round(quantizedGib, 2), paged_state_gib = Math.Round(pagedGib, 3), tflops = Math.Round((matmulFlops + attentionFlops) / dt / 1e12, 1),
            // The LORAHUB_FUSED setting and the path each fused-capable block took on the last step (issue 19 item 6).
            fused = Environment.GetEnvironmentVariable("LORAHUB_FUSED") ?? "default", paths = LoraFusionPaths.Report(model.named_modules()),
            mlp_lowrank_kernels = LoraFusionPaths.MlpLowRankKernels, backward_lowrank_kernels = LoraFusionPaths.BackwardLowRankKernels,
            stacked_qkv_bases = LoraFusionPaths.StackedQkvBases, mlp_residual_kernel = LoraFusionPaths.MlpResidualKernel,
            dependent_launch = LoRAHub.TorchExtensions.Cuda.DependentLaunch.Report,
            leaf_gradients_per_step = (CustomFunction.LeafGradientWrites - leafWrites) / Math.Max(steps, 1),
        }, new JsonSerializerOptions { NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals }));
        if (group != null) distributed.destroy_process_group();
    }
}
