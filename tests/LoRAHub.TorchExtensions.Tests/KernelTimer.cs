namespace LoRAHub.TorchExtensions.Tests;

/// <summary>The kernel microbenchmarks' clock ("timed when asked" tests on CUDA): host time per launch over a synced run.</summary>
internal static class KernelTimer
{
    /// <summary>
    /// Microseconds per call of <paramref name="launch"/>: up to 3 warm-up calls, then <paramref name="iterations"/>
    /// between two device syncs; tensors the calls leave behind are freed.
    /// </summary>
    public static double Microseconds(Action launch, int iterations)
    {
        using var scope = NewDisposeScope();
        for (var i = 0; i < Math.Min(3, iterations); i++) launch();
        torch.cuda.synchronize();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        for (var i = 0; i < iterations; i++) launch();
        torch.cuda.synchronize();
        return clock.Elapsed.TotalMicroseconds / iterations;
    }
}
