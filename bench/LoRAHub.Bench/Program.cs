using System.Diagnostics;
using System.Text.Json;
using LoRAHub.Torch;

// Usage: LoRAHub.Bench matmul [n] [device] | tiny-op [iterations] [device]
//        LoRAHub.Bench train SHAPE METHOD BATCH SEQ CKPT(0/1) [steps] [device]   (the arguments of peer_bench.py)
// Prints one JSON line per measurement; bench/torch_reference.py and peer_bench.py print the same fields.
var mode = args.Length > 0 ? args[0] : "tiny-op";
var device = Device.Parse(mode == "train"
    ? (args.Length > 7 ? args[7] : torch.cuda.is_available() ? "cuda" : "cpu")
    : mode == "load" ? (args.Length > 2 ? args[2] : torch.cuda.is_available() ? "cuda" : "cpu")
    : (args.Length > 2 ? args[2] : torch.cuda.is_available() ? "cuda" : "cpu"));

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
    case "matmul":
        Matmul(args.Length > 1 ? int.Parse(args[1]) : 8192, device);
        break;
    case "tiny-op":
        TinyOp(args.Length > 1 ? int.Parse(args[1]) : 100_000, device);
        break;
    default:
        Console.Error.WriteLine("usage: LoRAHub.Bench matmul [n] [device] | tiny-op [iterations] [device] | train SHAPE METHOD BATCH SEQ CKPT [steps] [device]");
        return 2;
}
return 0;

static void Sync(Device d)
{
    if (d.IsCuda) torch.cuda.synchronize(d.Index);
}

static void Print(object result) => Console.WriteLine(JsonSerializer.Serialize(result));

// bf16 n×n×n matmul throughput (TFLOP/s), the same loop as torch_reference.py.
static void Matmul(int n, Device d)
{
    var type = d.IsCuda ? ScalarType.BFloat16 : ScalarType.Float32;
    using var a = torch.randn([n, n], type, d);
    using var b = torch.randn([n, n], type, d);
    for (var i = 0; i < 5; i++) torch.matmul(a, b).Dispose();
    Sync(d);
    var iters = d.IsCuda ? 50 : 3;
    var sw = Stopwatch.StartNew();
    for (var i = 0; i < iters; i++) torch.matmul(a, b).Dispose();
    Sync(d);
    var seconds = sw.Elapsed.TotalSeconds / iters;
    Print(new { impl = "lorahub", bench = "matmul", n, dtype = type.ToTorchName(), device = d.ToString(), ms = Math.Round(seconds * 1e3, 3), tflops = Math.Round(2.0 * n * n * n / seconds / 1e12, 1) });
}

// Host overhead per tiny op: y = x + 1 on a 1-element tensor with requires_grad, inside a dispose scope.
static void TinyOp(int iterations, Device d)
{
    using var x = torch.ones([1], ScalarType.Float32, d, requires_grad: true);
    void Run(int n)
    {
        using var scope = torch.NewDisposeScope();
        for (var i = 0; i < n; i++) x.add(1.0).Dispose();
    }
    Run(10_000);
    Sync(d);
    var sw = Stopwatch.StartNew();
    Run(iterations);
    Sync(d);
    var us = sw.Elapsed.TotalMilliseconds * 1000 / iterations;
    Print(new { impl = "lorahub", bench = "tiny-op", op = "add(1-element, requires_grad)", device = d.ToString(), iterations, us_per_op = Math.Round(us, 3) });
}
