using LoRAHub.TorchExtensions;
using TorchSharp;
using static TorchSharp.torch;

// Usage: LoRAHub.Bench matmul [n] [device] | tiny-op [iterations] [device] | ops [iterations] [device]
//        LoRAHub.Bench train SHAPE METHOD BATCH SEQ CKPT(0/1) [steps] [device]   (the arguments of peer_bench.py)
//        LoRAHub.Bench load SHAPE [device]
//        LoRAHub.Bench ckpt SHAPE METHOD BATCH SEQ POLICY [steps] [device]   (POLICY: all, offload, budget:SIZE, none)
//        LoRAHub.Bench longest-seq SHAPE METHOD POLICY LIMIT_GIB [start] [max] [seconds] [device]
//        LoRAHub.Bench --nproc-per-node N train SHAPE METHOD BATCH SEQ CKPT [steps]   (data parallel on N GPUs, NCCL; batch per GPU)
// Prints one JSON line per measurement; bench/torch_reference.py and peer_bench.py print the same fields.
// LORAHUB_LIBTORCH picks the libtorch (an installed PyTorch's torch/lib for CUDA); before any TorchSharp call.
TorchRuntime.Initialize();
using var launchedRank = LoRAHub.Distributed.Launch.LaunchedRank.Register();
if (args.Length > 2 && args[0] == "--nproc-per-node")
{
    // The launcher of `loraHub run --nproc-per-node`: N ranks of this benchmark, torchrun's environment, a failed rank named.
    var launch = new LoRAHub.Distributed.Launch.LaunchOptions
    {
        NprocPerNode = int.Parse(args[1]), Backend = cuda.is_available() ? "nccl" : "mpi",
        MasterPort = int.TryParse(Environment.GetEnvironmentVariable("MASTER_PORT"), out var mp) ? mp : 29500,
    };
    var self = typeof(LoRAHub.Bench.TrainBench).Assembly.Location;
    return LoRAHub.Distributed.Launch.RankLauncher.Run(launch, Environment.ProcessPath ?? "dotnet", [self, .. args[2..]], Console.Error);
}
var mode = args.Length > 0 ? args[0] : "tiny-op";
var deviceArg = mode switch { "train" or "ckpt" => 7, "longest-seq" => 8, _ => 2 };
var device = torch.device(args.Length > deviceArg ? args[deviceArg] : cuda.is_available() ? "cuda:0" : "cpu");

switch (mode)
{
    case "load" when args.Length >= 2:
        LoRAHub.Bench.TrainBench.LoadTime(args[1], device);
        break;
    case "train" when args.Length >= 6:
        LoRAHub.Bench.TrainBench.Run(args[1], args[2], int.Parse(args[3]), int.Parse(args[4]), args[5] == "1",
            args.Length > 6 ? int.Parse(args[6]) : 8, warmup: 3, device, name => name switch
            {
                "lora" => new LoRAHub.Plugins.LoRA.LoraMethod(),
                "dora" => new LoRAHub.Plugins.DoRA.DoraMethod(),
                "qlora" => new LoRAHub.Plugins.QLoRA.QLoraMethod(),
                "galore" => new LoRAHub.Plugins.GaLore.GaLoreMethod(),
                "full" => new LoRAHub.Training.FullFineTuning(),
                _ => throw new ArgumentException($"unknown method '{name}' (lora, dora, qlora, galore, full)"),
            });
        break;
    case "ckpt" when args.Length >= 6: // SHAPE METHOD BATCH SEQ POLICY [steps] [device]: checkpoint policies (CheckpointBench)
        LoRAHub.Bench.CheckpointBench.Train(args[1], args[2], int.Parse(args[3]), int.Parse(args[4]), args[5], args.Length > 6 ? int.Parse(args[6]) : 8, device);
        break;
    case "longest-seq" when args.Length >= 5: // SHAPE METHOD POLICY LIMIT_GIB [start] [max] [seconds] [device]
        LoRAHub.Bench.CheckpointBench.LongestSequence(args[1], args[2], args[3], double.Parse(args[4], System.Globalization.CultureInfo.InvariantCulture),
            args.Length > 5 ? int.Parse(args[5]) : 32768, args.Length > 6 ? int.Parse(args[6]) : 196608,
            args.Length > 7 ? double.Parse(args[7], System.Globalization.CultureInfo.InvariantCulture) : 150, device);
        break;
    case "matmul":
        LoRAHub.Bench.OpBench.Matmul(args.Length > 1 ? int.Parse(args[1]) : 8192, device);
        break;
    case "tiny-op":
        LoRAHub.Bench.OpBench.TinyOp(args.Length > 1 ? int.Parse(args[1]) : 100_000, device);
        break;
    case "ops":
        LoRAHub.Bench.OpBench.Ops(args.Length > 1 ? int.Parse(args[1]) : 20_000, device);
        break;
    default:
        Console.Error.WriteLine("usage: LoRAHub.Bench matmul [n] [device] | tiny-op [iterations] [device] | ops [iterations] [device] | train SHAPE METHOD BATCH SEQ CKPT [steps] [device] | load SHAPE [device]");
        return 2;
}
return 0;
