using System.Diagnostics;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Bench;

/// <summary>
/// TorchSharp next to PyTorch eager (bench/torch_reference.py runs the same loops): matmul throughput, and the host
/// overhead per small op — P/Invoke, libtorch dispatch, autograd recording and freeing the result. C# frees each result
/// with Dispose as Python frees it by reference count, so both sides pay for allocation and release.
/// </summary>
public static class OpBench
{
    private static bool IsCuda(Device d) => d.type == DeviceType.CUDA;

    private static void Sync(Device d)
    {
        if (IsCuda(d)) cuda.synchronize(d);
    }

    private static void Print(object result) => Console.WriteLine(JsonSerializer.Serialize(result));

    private static string Name(ScalarType type) => type.ToString().ToLowerInvariant();

    /// <summary>n×n×n matmul throughput (TFLOP/s): bf16 on CUDA, fp32 on the CPU.</summary>
    public static void Matmul(int n, Device d)
    {
        var type = IsCuda(d) ? ScalarType.BFloat16 : ScalarType.Float32;
        using var a = randn([n, n], type, d);
        using var b = randn([n, n], type, d);
        for (var i = 0; i < 5; i++) matmul(a, b).Dispose();
        Sync(d);
        var iters = IsCuda(d) ? 50 : 3;
        var sw = Stopwatch.StartNew();
        for (var i = 0; i < iters; i++) matmul(a, b).Dispose();
        Sync(d);
        var seconds = sw.Elapsed.TotalSeconds / iters;
        Print(new { impl = "lorahub", bench = "matmul", n, dtype = Name(type), device = d.ToString(), ms = Math.Round(seconds * 1e3, 3), tflops = Math.Round(2.0 * n * n * n / seconds / 1e12, 3) });
    }

    /// <summary>y = x + 1 on a 1-element tensor with requires_grad, inside a dispose scope (the figure kept since 2026-11).</summary>
    public static void TinyOp(int iterations, Device d)
    {
        using var x = ones([1], ScalarType.Float32, d, requires_grad: true);
        void Run(int n)
        {
            using var scope = NewDisposeScope();
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

    /// <summary>Per-op host overhead of common small ops on 64×64 fp32 tensors (no grad), one JSON line per op.</summary>
    public static void Ops(int iterations, Device d)
    {
        using var x = randn([64, 64], ScalarType.Float32, d);
        using var w = randn([64, 64], ScalarType.Float32, d);
        using var idx = arange(0, 32, ScalarType.Int64, d);
        (string Name, Func<Tensor> Op)[] ops =
        [
            ("add", () => x.add(w)),
            ("mul_scalar", () => x.mul(2.0)),
            ("matmul", () => x.matmul(w)),
            ("linear", () => nn.functional.linear(x, w)),
            ("relu", () => x.relu()),
            ("softmax", () => x.softmax(-1)),
            ("sum_dim", () => x.sum(dim: 1)),
            ("view", () => x.view(4096)),
            ("transpose", () => x.transpose(0, 1)),
            ("narrow", () => x.narrow(0, 8, 16)),
            ("index_select", () => x.index_select(0, idx)),
            ("cat", () => cat([x, w], 0)),
            ("to_bf16", () => x.to(ScalarType.BFloat16)),
        ];
        foreach (var (name, op) in ops)
        {
            using var _ = no_grad();
            for (var i = 0; i < 2_000; i++) op().Dispose();
            Sync(d);
            var sw = Stopwatch.StartNew();
            for (var i = 0; i < iterations; i++) op().Dispose();
            Sync(d);
            var us = sw.Elapsed.TotalMilliseconds * 1000 / iterations;
            Print(new { impl = "lorahub", bench = "op", op = name, shape = "64x64", device = d.ToString(), iterations, us_per_op = Math.Round(us, 3) });
        }
    }
}
