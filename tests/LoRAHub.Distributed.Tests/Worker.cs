using System.Diagnostics;
using System.Text.Json;
using LoRAHub.Distributed.Launch;

namespace LoRAHub.Distributed.Tests;

/// <summary>
/// The ranks of the multi-process tests: this test assembly run as a program (`dotnet LoRAHub.Distributed.Tests.dll
/// SCENARIO ...`) under the launcher. A failed check throws, so the rank exits non-zero and the launcher reports it.
/// </summary>
public static class Worker
{
    public static int Main(string[] args)
    {
        TorchRuntime.Initialize();
        using var launched = LaunchedRank.Register();
        try
        {
            switch (args[0])
            {
                case "collectives": Collectives(); break;
                case "hang": Hang(); break;
                case "layered": Layered(args[1], int.Parse(args[2]), long.Parse(args[3]), args[4], args[5] == "1", args[6]); break;
                case "train": Train(args[1], int.Parse(args[2]), long.Parse(args[3]), args[4] == "1", args[5] == "1", long.Parse(args[6]), args.Length > 7 ? args[7] : "full",
                    args.Length > 8 ? double.Parse(args[8], System.Globalization.CultureInfo.InvariantCulture) : 0); break;
                default: throw new ArgumentException($"unknown scenario {args[0]}");
            }
            distributed.destroy_process_group();
            return 0;
        }
        catch (Exception e)
        {
            Console.Error.WriteLine($"rank {Environment.GetEnvironmentVariable("RANK") ?? Environment.GetEnvironmentVariable("PMI_RANK")}: {e}");
            launched.ExitCode = 3;
            return 3;
        }
    }

    private static void Require(bool ok, string what)
    {
        if (!ok) throw new InvalidOperationException("check failed: " + what);
    }

    /// <summary>Each collective on two ranks, in fp32, bf16 (through fp32 on MPI), int64, and a strided view.</summary>
    private static void Collectives()
    {
        var g = distributed.init_process_group(CPU);
        var r = g.Rank;
        var n = g.WorldSize;
        Require(n == 2 && g.Backend == "mpi", $"world {n}, backend {g.Backend}");

        using var a = tensor(new float[] { r + 1, 10 * (r + 1), -r });
        g.all_reduce(a);
        Require(a.data<float>().SequenceEqual([3f, 30f, -1f]), $"all_reduce sum: {string.Join(",", a.data<float>().ToArray())}");

        using var m = tensor(new long[] { r, 5 - r });
        g.all_reduce(m, ReduceOp.MAX);
        Require(m.data<long>().SequenceEqual([1L, 5L]), "all_reduce max int64");

        using var h = full(new long[] { 4 }, r + 0.5, ScalarType.BFloat16);
        g.all_reduce(h);
        Require(h.to(ScalarType.Float32).data<float>().All(v => v == 2f), "all_reduce bf16");

        using var strided = arange(0, 8, ScalarType.Float32).reshape(2, 4).t(); // non-contiguous
        if (r == 1) strided.mul_(0);
        g.broadcast(strided, 0);
        Require(strided.contiguous().data<float>().SequenceEqual(arange(0, 8, ScalarType.Float32).reshape(2, 4).t().contiguous().data<float>().ToArray()), "broadcast strided");

        using var b = full(new long[] { 3 }, r == 1 ? 7f : 0f);
        g.broadcast(b, 1);
        Require(b.data<float>().All(v => v == 7f), "broadcast from rank 1");

        using var input = full(new long[] { 2 }, (float)r);
        using var gathered = zeros(4);
        g.all_gather(gathered, input);
        Require(gathered.data<float>().SequenceEqual([0f, 0f, 1f, 1f]), "all_gather");

        using var whole = arange(0, 4, ScalarType.Float32).add(r);
        using var part = zeros(2);
        g.reduce_scatter(part, whole);
        Require(part.data<float>().SequenceEqual(r == 0 ? [1f, 3f] : [5f, 7f]), $"reduce_scatter: {string.Join(",", part.data<float>().ToArray())}");

        var threw = false;
        try { g.all_gather(zeros(3), input); }
        catch (ArgumentException) { threw = true; }
        Require(threw, "a wrongly sized all_gather is refused before any rank blocks");

        if (r == 1) Thread.Sleep(300);
        var clock = Stopwatch.StartNew();
        g.barrier();
        Require(r == 1 || clock.ElapsedMilliseconds >= 250, "barrier waited for rank 1");
    }

    /// <summary>Rank 1 never joins rank 0's all-reduce: rank 0's watchdog must end the job after LORAHUB_DIST_TIMEOUT.</summary>
    private static void Hang()
    {
        var g = distributed.init_process_group(CPU);
        if (g.Rank == 1)
        {
            Thread.Sleep(TimeSpan.FromSeconds(60));
            return;
        }
        using var t = ones(4);
        g.all_reduce(t);
        throw new InvalidOperationException("the all-reduce returned although rank 1 never joined");
    }

    /// <summary>
    /// Trains the tiny model on rows of unequal masked lengths; rank 0 writes the losses to OUT/losses.json.
    /// killAtStep &gt; 0: rank 1 kills itself (SIGKILL) after that step.
    /// </summary>
    private static void Train(string output, int batch, long steps, bool shard, bool resume, long killAtStep, string method, double dropout)
    {
        using var model = TinyModel.Create(dropout);
        var trainer = new Trainer(model, TestMethods.Attach(model, method), TrainOptions(output, batch, steps, shard, resume));
        if (killAtStep > 0)
            trainer.StepCompleted += m =>
            {
                if (m.Step == killAtStep && DistributedEnvironment.FromEnvironment().Rank == 1) Process.GetCurrentProcess().Kill();
            };
        var result = trainer.Train(TinyModel.Rows());
        if (DistributedEnvironment.FromEnvironment().Rank == 0)
            File.WriteAllText(Path.Combine(output, "losses.json"), JsonSerializer.Serialize(result.Losses));
    }

    /// <summary>
    /// Trains the layered model (<see cref="LayeredModel"/>, sync points for the overlapped gradient all-reduce); rank 0
    /// writes the losses to OUT/losses.json, every rank its bucket launches (during / after backward) to OUT/launches-RANK.json.
    /// </summary>
    private static void Layered(string output, int batch, long steps, string variant, bool shard, string method)
    {
        using var model = OverlapModels.Create(variant);
        var result = new Trainer(model, TestMethods.Attach(model, method), TrainOptions(output, batch, steps, shard, false))
            .Train(TinyModel.Rows());
        var rank = DistributedEnvironment.FromEnvironment().Rank;
        var (inBackward, afterBackward) = GradientBuckets.Launches;
        File.WriteAllText(Path.Combine(output, $"launches-{rank}.json"), JsonSerializer.Serialize(new[] { inBackward, afterBackward }));
        if (rank == 0) File.WriteAllText(Path.Combine(output, "losses.json"), JsonSerializer.Serialize(result.Losses));
    }

    public static TrainerOptions TrainOptions(string output, int batch, long steps, bool shard, bool resume) => new()
    {
        OutputDir = output, MaxSteps = steps, BatchSize = batch, LearningRate = 5e-2, WarmupSteps = 0, Schedule = LearningRateSchedule.Constant,
        WeightDecay = 0.01, GradientAccumulationSteps = 2, SaveEvery = 2, ShowProgress = false, LogEvery = 0, Seed = 11,
        ShardOptimizerState = shard, Resume = resume, BucketSizeBytes = 2048, // small buckets: several per step
    };
}
