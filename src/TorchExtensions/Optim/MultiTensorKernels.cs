using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Optim;

/// <summary>
/// Launchers of Kernels/optim.cu: AdamW over every trainable tensor of a device in one launch, and the gradient norm and
/// scaling of clip_grad_norm_. The tensors are described by a table (see optim.cu) uploaded each call from pinned host
/// memory, asynchronously, so a step does not wait for the GPU.
/// </summary>
internal static class MultiTensorKernels
{
    private const int Record = 10;
    private const long Chunk = 16384;   // elements per block
    private const int Threads = 512;

    private static readonly CudaProgram program = CudaProgram.Embedded("optim.cu", dependentLaunch: true);

    /// <summary>One tensor of a multi-tensor launch (pointers to contiguous memory on one device).</summary>
    public readonly record struct Item(IntPtr Param, IntPtr Grad, IntPtr ExpAvg, IntPtr ExpAvgSq, long Numel,
        ScalarType ParamType, ScalarType GradType, ScalarType StateType, double Lr = 0, double WeightDecay = 0, double Bc1 = 1, double Bc2Sqrt = 1);

    /// <summary>Uploads the table of <paramref name="items"/> to <paramref name="device"/>; returns it and the number of blocks.</summary>
    private static (Tensor table, int blocks) Table(IReadOnlyList<Item> items, int device)
    {
        var chunks = items.Select(i => (i.Numel + Chunk - 1) / Chunk).ToArray();
        var blocks = chunks.Sum();
        if (blocks > int.MaxValue) throw new ArgumentException("too many elements for one multi-tensor launch");
        var words = new long[items.Count * Record + blocks];
        long next = items.Count * Record;
        for (var t = 0; t < items.Count; t++)
        {
            var i = items[t];
            var r = t * Record;
            words[r + 0] = i.Param;
            words[r + 1] = i.Grad;
            words[r + 2] = i.ExpAvg;
            words[r + 3] = i.ExpAvgSq;
            words[r + 4] = i.Numel;
            words[r + 5] = KernelTensors.Code(i.ParamType) | KernelTensors.Code(i.GradType) << 8 | KernelTensors.Code(i.StateType) << 16;
            words[r + 6] = BitConverter.DoubleToInt64Bits(i.Lr);
            words[r + 7] = BitConverter.DoubleToInt64Bits(i.WeightDecay);
            words[r + 8] = BitConverter.DoubleToInt64Bits(i.Bc1);
            words[r + 9] = BitConverter.DoubleToInt64Bits(i.Bc2Sqrt);
            for (long c = 0; c < chunks[t]; c++) words[next++] = (long)t << 32 | c;
        }
        using var scope = NewDisposeScope();
        // Pinned memory and a non-blocking copy: libtorch's host allocator keeps the pinned block until the copy is done.
        var host = tensor(words, ScalarType.Int64).pin_memory();
        var table = host.to(DeviceType.CUDA, device, non_blocking: true);
        return (table.MoveToOuterDisposeScope(), (int)blocks);
    }

    /// <summary>
    /// Compiles and loads the optimizer kernels for <paramref name="device"/> if needed; false when that failed (the
    /// kernels are then off for the process and callers take their composite path).
    /// </summary>
    public static bool TryPrepare(int device)
    {
        try
        {
            program.Function(device, "lh_adamw");
            program.Function(device, "lh_grad_sumsq");
            program.Function(device, "lh_grad_scale");
            return true;
        }
        catch (KernelCompileException)
        {
            return false;
        }
    }

    /// <summary>One AdamW step over <paramref name="items"/> (all on <paramref name="device"/>).</summary>
    public static void AdamW(int device, IReadOnlyList<Item> items, double beta1, double beta2, double eps)
    {
        if (items.Count == 0) return;
        var (table, blocks) = Table(items, device);
        using (table)
        {
            program.Function(device, "lh_adamw").Launch(blocks, Threads, 0, new KernelArgs()
                .Ptr(KernelTensors.Ptr(table)).I32(items.Count).I64(Chunk)
                .F32((float)beta1).F32((float)(1 - beta1)).F32((float)beta2).F32((float)(1 - beta2)).F32((float)eps));
        }
    }

    /// <summary>Σ grad² over every gradient of <paramref name="items"/> (all on <paramref name="device"/>), as a 0-d fp64 tensor there.</summary>
    public static Tensor GradSumOfSquares(int device, IReadOnlyList<Item> items)
    {
        using var scope = NewDisposeScope();
        var (table, blocks) = Table(items, device);
        var partial = empty([blocks], ScalarType.Float32, new Device(DeviceType.CUDA, device));
        program.Function(device, "lh_grad_sumsq").Launch(blocks, Threads, 0, new KernelArgs()
            .Ptr(KernelTensors.Ptr(table)).I32(items.Count).I64(Chunk).Ptr(KernelTensors.Ptr(partial)));
        return partial.sum(ScalarType.Float64).MoveToOuterDisposeScope();
    }

    /// <summary>grad ← grad · coef for every gradient of <paramref name="items"/>.</summary>
    public static void ScaleGrads(int device, IReadOnlyList<Item> items, float coef)
    {
        if (items.Count == 0) return;
        var (table, blocks) = Table(items, device);
        using (table)
            program.Function(device, "lh_grad_scale").Launch(blocks, Threads, 0, new KernelArgs()
                .Ptr(KernelTensors.Ptr(table)).I32(items.Count).I64(Chunk).F32(coef));
    }
}
