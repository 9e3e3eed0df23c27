using System.Diagnostics.CodeAnalysis;
using System.Runtime.CompilerServices;

namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>Tells <see cref="TorchRuntime.Describe"/> how to report our kernels (it lives apart from them).</summary>
internal static class KernelStatusRegistration
{
    [ModuleInitializer]
    [SuppressMessage("Usage", "CA2255", Justification = "registers a callback only; nothing is loaded until it is called")]
    internal static void Register() => TorchRuntime.KernelStatus ??= CudaKernels.Describe;
}
