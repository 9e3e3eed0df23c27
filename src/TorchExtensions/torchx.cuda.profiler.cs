using LoRAHub.TorchExtensions.Cuda;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    public static unsafe partial class cuda
    {
        /// <summary>
        /// torch.cuda.profiler: marks the range a profiler started with "capture from an API call" records
        /// (<c>ncu --profile-from-start off</c>), through the driver's cuProfilerStart/cuProfilerStop on the current context.
        /// Without a profiler attached both do nothing.
        /// </summary>
        public static class profiler
        {
            public static void start() => Call(start: true);

            public static void stop() => Call(start: false);

            private static void Call(bool start)
            {
                var name = start ? "cuProfilerStart" : "cuProfilerStop";
                if (CudaDriver.EnsureLoaded() is { } why) throw new InvalidOperationException($"{name}: {why}");
                var f = start ? CudaDriver.cuProfilerStart : CudaDriver.cuProfilerStop;
                if (f == null) throw new InvalidOperationException($"{name}: the CUDA driver library does not export it; update the NVIDIA driver");
                CudaDriver.Check(f(), name);
            }
        }
    }
}
